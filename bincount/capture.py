"""Data capture in SageMaker's JSON Lines format: records, a writer off the request path, a reader.

One line per captured request (SageMaker's ``captureData`` layout; what this project adds lives under
``eventMetadata.bincount``)::

    {"captureData": {"endpointInput":  {"observedContentType": "image/jpeg", "mode": "INPUT",
                                        "data": "<base64>", "encoding": "BASE64"},
                     "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT",
                                        "data": "{\"predictions\": ...}", "encoding": "JSON"}},
     "eventMetadata": {"eventId": "<uuid>", "inferenceId": "<the client's InferenceId>",
                       "inferenceTime": "2026-11-30T20:15:03.123Z",
                       "bincount": {"status": 200, "latencyMs": 41.2, "modelVersion": "bincount:3", "input": "inline"}},
     "eventVersion": "0"}

``status`` is what the caller got; when that is the runtime's ``ModelError`` (424), ``originalStatus`` is the
model container's own status inside it (a 500 is the model's fault, a 415 the caller's). SageMaker's own
records carry neither: there the monitor reads the error counts from CloudWatch.

Files: ``<artifact_root>/data-capture/<endpoint>/<variant>/yyyy/mm/dd/hh/<mm-ss-mmm>-<uuid>.jsonl``,
a new file each hour and past ``max_file_bytes``. Images: request bodies up to
``max_inline_bytes`` are kept whole (base64 inline); bigger ones as a JPEG thumbnail of at most
``THUMBNAIL_PX`` px a side (``bincount.input = "thumbnail"``), so capture stays near the size of
the photos themselves and the monitor's input statistics still have pixels to read.

The writer never slows or fails a request: :meth:`CaptureWriter.offer` puts the raw bytes on a
bounded queue (or counts a drop when it is full) and one thread encodes and writes them.
:meth:`CaptureWriter.close` writes what is queued, then closes (and on ``s3://`` uploads) the file.

On ``s3://`` nothing reported as captured is lost to a failed upload: each file is staged in a local
folder kept per destination (``<tmp>/bincount-capture/<digest of the prefix>/<writer>/``) and stays there
until its upload succeeded; failed uploads are retried with exponential backoff; what still could not be
uploaded at close is logged and counted (``pending``), and the next writer for the same destination (the
router's next start) picks it up and uploads it. A writer holds a lock on its own folder while it runs, so
only folders whose writer is gone (closed or killed) are picked up.

Reading (:class:`CaptureReader`) streams: one file at a time, one line at a time, into typed
:class:`CaptureRecord`; a line that does not parse, is cut short or lacks a field is skipped and listed.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import logging
import os
import queue
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image

from bincount.contracts.serving import CaptureConfig
from bincount.storage import ObjectNotFoundError, Storage, StorageError, join_uri, local_path

logger = logging.getLogger("bincount.capture")

EVENT_VERSION = "0"
THUMBNAIL_PX = 256
_THUMBNAIL_MAX_PIXELS = 50_000_000  # refuse to thumbnail decompression bombs


def capture_prefix(artifact_uri: str, endpoint: str, variant: str = "AllTraffic") -> str:
    """``<artifact_root>/data-capture/<endpoint>/<variant>`` (``artifact_uri``: the artifact root)."""
    return join_uri(artifact_uri, "data-capture", endpoint, variant)


@dataclass
class Exchange:
    """One request and its answer, as the front door saw them (raw bytes: encoding happens off the request path)."""

    body: bytes
    content_type: str
    answer: bytes
    answer_type: str
    status: int
    latency_ms: float
    at: dt.datetime
    inference_id: str | None = None
    model_version: str | None = None
    original_status: int | None = None  # the model's own status inside the runtime's ModelError (424)


def _input_part(exchange: Exchange, max_inline_bytes: int) -> tuple[dict[str, str], str]:
    if len(exchange.body) <= max_inline_bytes:
        data, content_type, kept = exchange.body, exchange.content_type, "inline"
    else:
        try:
            with Image.open(io.BytesIO(exchange.body)) as image:
                if image.width * image.height > _THUMBNAIL_MAX_PIXELS:
                    raise ValueError("too many pixels")
                image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))
                thumb = image.convert("RGB")
                thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            thumb.save(buffer, format="JPEG", quality=85)
            data, content_type, kept = buffer.getvalue(), "image/jpeg", "thumbnail"
        except (OSError, ValueError, Image.DecompressionBombError):
            data, content_type, kept = b"", exchange.content_type, "dropped"
    part = {
        "observedContentType": content_type,
        "mode": "INPUT",
        "data": base64.b64encode(data).decode(),
        "encoding": "BASE64",
    }
    return part, kept


def capture_record(exchange: Exchange, max_inline_bytes: int) -> dict[str, Any]:
    """The JSON Lines record of one exchange (the layout in the module docstring)."""
    input_part, kept = _input_part(exchange, max_inline_bytes)
    try:
        output = {"data": exchange.answer.decode(), "encoding": "JSON" if "json" in exchange.answer_type else "CSV"}
    except UnicodeDecodeError:
        output = {"data": base64.b64encode(exchange.answer).decode(), "encoding": "BASE64"}
    metadata: dict[str, Any] = {
        "eventId": str(uuid.uuid4()),
        "inferenceTime": exchange.at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "bincount": {
            "status": exchange.status,
            "latencyMs": round(exchange.latency_ms, 3),
            "modelVersion": exchange.model_version,
            "input": kept,
        },
    }
    if exchange.original_status is not None:
        metadata["bincount"]["originalStatus"] = exchange.original_status
    if exchange.inference_id:
        metadata["inferenceId"] = exchange.inference_id
    return {
        "captureData": {
            "endpointInput": input_part,
            "endpointOutput": {"observedContentType": exchange.answer_type, "mode": "OUTPUT", **output},
        },
        "eventMetadata": metadata,
        "eventVersion": EVENT_VERSION,
    }


@dataclass
class CaptureStats:
    """What a writer did. ``captured``: records written to a file (in place, or staged on ``s3://``);
    ``stored``: records at the destination; ``pending``: staged records not uploaded yet (kept, retried, and
    picked up by the next writer); ``recovered``: records an earlier writer left staged, picked up by this one;
    ``dropped``: not sampled in because the queue was full; ``failed``: lost to local write errors."""

    offered: int = 0
    captured: int = 0
    stored: int = 0
    pending: int = 0
    pending_files: int = 0  # closed files waiting for their upload (the open one is not yet)
    recovered: int = 0
    dropped: int = 0
    failed: int = 0
    files: int = 0
    upload_failures: int = 0
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Staged:
    """A closed file waiting for its upload."""

    path: Path
    uri: str
    records: int


def staging_root(prefix_uri: str) -> Path:
    """Where the writers of ``prefix_uri`` stage their files: the same folder on every start."""
    digest = hashlib.sha256(prefix_uri.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "bincount-capture" / digest


_TICK = object()  # the writer thread woke up to retry an upload, not for a record


class CaptureWriter:
    """Samples exchanges into a bounded queue; one thread writes them as rolled JSON Lines files under ``prefix_uri``.

    On ``file://`` files are written in place (a reader may see the file grow); on ``s3://`` each file is
    staged under ``staging`` (default :func:`staging_root`) and uploaded when it rolls (hourly, by size, and on
    close), retried with backoff from ``retry_initial_s`` to ``retry_max_s`` until it is; ``close`` keeps
    trying for ``close_upload_s``.
    """

    def __init__(
        self,
        prefix_uri: str,
        config: CaptureConfig,
        storage: Storage,
        staging: Path | None = None,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        close_upload_s: float = 20.0,
    ) -> None:
        self.prefix_uri = prefix_uri.rstrip("/")
        self.config = config
        self.storage = storage
        self.stats = CaptureStats()
        self._retry_initial_s, self._retry_max_s, self._close_upload_s = retry_initial_s, retry_max_s, close_upload_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._file: IO[bytes] | None = None
        self._file_path: Path | None = None
        self._file_uri: str | None = None
        self._file_hour: str | None = None
        self._file_bytes = 0
        self._file_records = 0
        self._staged: list[_Staged] = []
        self._retry_at = 0.0
        self._retry_delay = retry_initial_s
        self._in_place = self.prefix_uri.startswith("file://")
        self._root = staging or staging_root(self.prefix_uri)
        self._own: Path | None = None
        self._lock_fd: int | None = None
        if not self._in_place:
            self._claim_staging()
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        """Whether the next exchange is to be captured (decide before copying anything)."""
        return random.random() * 100.0 < self.config.sampling_percentage

    def offer(self, exchange: Exchange) -> bool:
        """Queue ``exchange`` without waiting; False (and a counted drop) when the queue is full."""
        self.stats.offered += 1
        try:
            self._queue.put_nowait(exchange)
        except queue.Full:
            self.stats.dropped += 1
            return False
        return True

    def close(self, timeout_s: float = 60.0) -> CaptureStats:
        """Write everything queued, close the current file, upload what is staged (``s3://``), stop the thread.

        Returns the stats: ``pending`` > 0 says how many records could not be uploaded; they stay staged for the
        next writer of this destination.
        """
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.error(
                "capture writer did not finish within %.0f s; %d records still queued", timeout_s, self._queue.qsize()
            )
        elif not self._in_place:
            self._release_staging()
        return self.stats

    # the writer thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            wait = max(0.0, self._retry_at - time.monotonic()) if self._staged else None
            try:
                exchange = self._queue.get(timeout=wait)
            except queue.Empty:
                exchange = _TICK
            if exchange is None:
                break
            if exchange is not _TICK:
                self._capture(exchange)
            if self._staged and time.monotonic() >= self._retry_at:
                self._upload_staged()
        try:
            self._roll()
        except OSError as error:
            self.stats.last_error = f"{type(error).__name__}: {error}"
            logger.error("last capture file not closed: %s", self.stats.last_error)
        deadline = time.monotonic() + self._close_upload_s
        while self._staged and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self._retry_at, deadline) - time.monotonic()))
            self._upload_staged()
        if self._staged:
            logger.error(
                "%d capture records in %d files could not be uploaded to %s (last error: %s); they stay staged in %s "
                "and the next writer for this destination uploads them",
                self.stats.pending,
                self.stats.pending_files,
                self.prefix_uri,
                self.stats.last_error,
                self._own,
            )

    def _capture(self, exchange: Exchange) -> None:
        try:
            self._write(exchange)
        except (OSError, ValueError) as error:
            self.stats.failed += 1
            self.stats.last_error = f"{type(error).__name__}: {error}"
            logger.error("capture record lost: %s", self.stats.last_error)
            return
        self.stats.captured += 1
        if self._in_place:
            self.stats.stored += 1
        else:
            self.stats.pending += 1

    def _write(self, exchange: Exchange) -> None:
        line = (
            json.dumps(capture_record(exchange, self.config.max_inline_bytes), separators=(",", ":")) + "\n"
        ).encode()
        hour = exchange.at.astimezone(dt.UTC).strftime("%Y/%m/%d/%H")
        if self._file is None or hour != self._file_hour or self._file_bytes + len(line) > self.config.max_file_bytes:
            self._roll()
            self._open(hour, exchange.at)
        assert self._file is not None
        self._file.write(line)
        self._file.flush()
        self._file_bytes += len(line)
        self._file_records += 1

    def _open(self, hour: str, at: dt.datetime) -> None:
        name = f"{at.astimezone(dt.UTC).strftime('%M-%S-%f')[:-3]}-{uuid.uuid4().hex[:12]}.jsonl"
        self._file_uri = join_uri(self.prefix_uri, hour, name)
        if self._in_place:
            self._file_path = local_path(self._file_uri)
        else:
            assert self._own is not None
            self._file_path = self._own / hour.replace("/", "-") / name
        self._file_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._file_path.open("ab")
        self._file_hour, self._file_bytes, self._file_records = hour, 0, 0
        self.stats.files += 1

    def _roll(self) -> None:
        """Close the current file; on ``s3://`` it joins the files waiting for their upload."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if not self._in_place:
            assert self._file_path is not None and self._file_uri is not None
            self._staged.append(_Staged(self._file_path, self._file_uri, self._file_records))
            self.stats.pending_files += 1

    def _upload_staged(self) -> None:
        """Upload the staged files in order; on a failure keep them all and retry after a growing delay."""
        while self._staged:
            staged = self._staged[0]
            try:
                self.storage.upload_file(staged.path, staged.uri)
            except (OSError, StorageError) as error:
                self.stats.upload_failures += 1
                self.stats.last_error = f"{type(error).__name__}: {error}"
                logger.warning(
                    "upload of capture file %s failed (%s): %d files kept, retried in %.1f s",
                    staged.uri,
                    self.stats.last_error,
                    len(self._staged),
                    self._retry_delay,
                )
                self._retry_at = time.monotonic() + self._retry_delay
                self._retry_delay = min(self._retry_delay * 2, self._retry_max_s)
                return
            staged.path.unlink(missing_ok=True)
            self._staged.pop(0)
            self.stats.stored += staged.records
            self.stats.pending -= staged.records
            self.stats.pending_files -= 1
            self._retry_delay = self._retry_initial_s

    # staging -------------------------------------------------------------------------------------------
    def _claim_staging(self) -> None:
        """Make this writer's own staging folder (locked while it runs) and adopt what gone writers left."""
        self._own = self._root / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._own.mkdir(parents=True)
        self._lock_fd = os.open(self._own / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        for folder in sorted(path for path in self._root.iterdir() if path.is_dir() and path != self._own):
            self._adopt(folder)
        if self._staged:
            logger.warning(
                "picked up %d capture records in %d files that an earlier writer could not upload to %s",
                self.stats.pending,
                self.stats.pending_files,
                self.prefix_uri,
            )

    def _adopt(self, folder: Path) -> None:
        """Move the files of ``folder`` into this writer's own if its writer is gone (its lock is free)."""
        try:
            fd = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        except OSError:
            return  # removed meanwhile by another writer that adopted it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # its writer still runs
            assert self._own is not None
            for path in sorted(folder.glob("*/*.jsonl")):
                target = self._own / path.parent.name / path.name
                target.parent.mkdir(exist_ok=True)
                path.rename(target)
                hour = path.parent.name.replace("-", "/")
                records = _count_lines(target)
                self._staged.append(_Staged(target, join_uri(self.prefix_uri, hour, path.name), records))
                self.stats.recovered += records
                self.stats.pending += records
                self.stats.pending_files += 1
            _remove_tree_of_empty_folders(folder)
        finally:
            os.close(fd)

    def _release_staging(self) -> None:
        """Unlock this writer's folder; remove it (and the empty folders above) when nothing is left staged."""
        if self._lock_fd is None or self._own is None:
            return
        if not self._staged:
            _remove_tree_of_empty_folders(self._own)
            for folder in (self._root, self._root.parent):
                with contextlib.suppress(OSError):  # another writer's folder is still there
                    folder.rmdir()
        os.close(self._lock_fd)
        self._lock_fd = None


def _count_lines(path: Path) -> int:
    with path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


def _remove_tree_of_empty_folders(folder: Path) -> None:
    """Remove ``folder``'s lock file and its empty hour folders, then ``folder`` itself (left if a file remains)."""
    (folder / ".lock").unlink(missing_ok=True)
    for hour in folder.iterdir():
        if hour.is_dir():
            with contextlib.suppress(OSError):
                hour.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


# reading ----------------------------------------------------------------------------------------------------


class CaptureRecordError(ValueError):
    """A capture line that is not a record this reader can use; the message says what is wrong."""


@dataclass(frozen=True)
class CaptureRecord:
    """One captured request, as read back (either backend's records; SageMaker's carry no status or latency)."""

    at: dt.datetime  # eventMetadata.inferenceTime, in UTC
    inference_id: str | None
    status: int | None  # what the caller got; None where it was not recorded (SageMaker's own records)
    original_status: int | None  # inside the runtime's ModelError (424): the model container's own status
    latency_ms: float | None
    model_version: str | None
    input_kept: str  # inline | thumbnail | dropped
    input_content_type: str
    input_encoding: str
    input_data: str
    output_encoding: str
    output_data: str

    def image(self) -> bytes | None:
        """The request body as kept (a whole image, or a thumbnail), or None when it was not kept."""
        if self.input_encoding != "BASE64" or not self.input_data:
            return None
        return base64.b64decode(self.input_data)


def parse_time(text: str) -> dt.datetime:
    """An ``inferenceTime`` (``2026-11-30T20:15:03.123Z`` or SageMaker's ``...T20:15:03Z``) as an aware UTC time."""
    at = dt.datetime.fromisoformat(text)
    if at.tzinfo is None:
        raise ValueError(f"inferenceTime {text!r} has no time zone")
    return at.astimezone(dt.UTC)


def format_time(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_record(document: Any) -> CaptureRecord:
    """The typed record of one parsed capture line; raises :class:`CaptureRecordError` naming what is missing."""
    if not isinstance(document, dict):
        raise CaptureRecordError("not a JSON object")
    version = str(document.get("eventVersion", EVENT_VERSION))
    if version != EVENT_VERSION:
        raise CaptureRecordError(f"eventVersion {version} is newer than this reader's ({EVENT_VERSION})")
    metadata, data = document.get("eventMetadata"), document.get("captureData")
    if not isinstance(metadata, dict) or "inferenceTime" not in metadata:
        raise CaptureRecordError("no eventMetadata.inferenceTime")
    if not isinstance(data, dict):
        raise CaptureRecordError("no captureData")
    try:
        at = parse_time(str(metadata["inferenceTime"]))
    except ValueError as error:
        raise CaptureRecordError(f"inferenceTime: {error}") from None
    parts = {}
    for name in ("endpointInput", "endpointOutput"):
        part = data.get(name)
        if not isinstance(part, dict) or not isinstance(part.get("data"), str):
            raise CaptureRecordError(f"no captureData.{name}.data")
        parts[name] = part
    ours = metadata.get("bincount") if isinstance(metadata.get("bincount"), dict) else {}
    try:
        status = int(ours["status"]) if "status" in ours else None
        original = int(ours["originalStatus"]) if "originalStatus" in ours else None
        latency = float(ours["latencyMs"]) if "latencyMs" in ours else None
    except (TypeError, ValueError):
        raise CaptureRecordError("eventMetadata.bincount has a status or latency that is not a number") from None
    inference_id = metadata.get("inferenceId")
    return CaptureRecord(
        at=at,
        inference_id=str(inference_id) if inference_id else None,
        status=status,
        original_status=original,
        latency_ms=latency,
        model_version=ours.get("modelVersion"),
        input_kept=str(ours.get("input", "inline")),
        input_content_type=str(parts["endpointInput"].get("observedContentType", "")),
        input_encoding=str(parts["endpointInput"].get("encoding", "")),
        input_data=parts["endpointInput"]["data"],
        output_encoding=str(parts["endpointOutput"].get("encoding", "")),
        output_data=parts["endpointOutput"]["data"],
    )


def _time_of(document: Any) -> dt.datetime | None:
    """The inferenceTime of a line that is not a usable record, where it has one (so the cursor passes it)."""
    try:
        return parse_time(str(document["eventMetadata"]["inferenceTime"]))
    except (KeyError, TypeError, ValueError):
        return None


def _hour_of(relative: str) -> str | None:
    """``yyyy/mm/dd/hh`` of a capture file's relative path, or None when it is not laid out like one."""
    parts = relative.split("/")
    if len(parts) != 5 or not all(part.isdigit() for part in parts[:4]):
        return None
    return "/".join(parts[:4])


MAX_PROBLEMS = 200  # listed one by one; past this only counted


class CaptureReader:
    """The records under ``prefix_uri`` later than ``after`` (and not before ``not_before``), streamed.

    Iterate it once. Memory stays bounded by one capture file (``CaptureConfig.max_file_bytes``) and one
    line, never the whole window. Foreign files, lines that do not parse, are cut short or lack a field, and
    records of a newer ``eventVersion`` are skipped: listed in ``problems`` (the first ``MAX_PROBLEMS``) and
    counted in ``skipped``. ``earliest`` and ``latest`` span every line read that has a time, skipped ones
    too, so a cursor set to ``latest`` passes the bad lines as well.
    """

    def __init__(
        self,
        storage: Storage,
        prefix_uri: str,
        after: dt.datetime | None = None,
        not_before: dt.datetime | None = None,
    ) -> None:
        self.storage, self.prefix_uri = storage, prefix_uri.rstrip("/")
        self.after, self.not_before = after, not_before
        self.problems: list[str] = []
        self.skipped = 0
        self.files = 0
        self.earliest: dt.datetime | None = None
        self.latest: dt.datetime | None = None

    def _skip(self, problem: str) -> None:
        self.skipped += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def _wanted(self, at: dt.datetime) -> bool:
        return (self.after is None or at > self.after) and (self.not_before is None or at >= self.not_before)

    def _seen(self, at: dt.datetime) -> None:
        self.earliest = at if self.earliest is None else min(self.earliest, at)
        self.latest = at if self.latest is None else max(self.latest, at)

    def __iter__(self) -> Iterator[CaptureRecord]:
        base = self.prefix_uri + "/"
        bounds = [at for at in (self.after, self.not_before) if at is not None]
        first_hour = max(bounds).astimezone(dt.UTC).strftime("%Y/%m/%d/%H") if bounds else None
        for info in self.storage.list(self.prefix_uri):
            relative = info.uri[len(base) :]
            hour = _hour_of(relative)
            if hour is None or not relative.endswith(".jsonl"):
                self._skip(f"{relative}: not a capture file (expected yyyy/mm/dd/hh/<name>.jsonl): skipped")
                continue
            if first_hour and hour < first_hour:
                continue
            self.files += 1
            yield from self._read_file(info.uri, relative)

    def _read_file(self, uri: str, relative: str) -> Iterator[CaptureRecord]:
        try:
            data = self.storage.read_bytes(uri)
        except ObjectNotFoundError:
            self._skip(f"{relative}: listed but gone when read (deleted or moved meanwhile): skipped")
            return
        stream = io.BytesIO(data)
        del data
        number = 0
        for raw in stream:
            number += 1
            if not raw.strip():
                continue
            cut = not raw.endswith(b"\n")
            try:
                document = json.loads(raw)
            except (ValueError, RecursionError):
                last = " (the last line, cut short: a file still being written, or truncated)" if cut else ""
                self._skip(f"{relative} line {number}: not JSON{last}: skipped")
                continue
            try:
                record = parse_record(document)
            except CaptureRecordError as error:
                at = _time_of(document)
                if at is not None and not self._wanted(at):
                    continue  # before the window: an earlier run listed it
                if at is not None:
                    self._seen(at)
                self._skip(f"{relative} line {number}: not a capture record ({error}): skipped")
                continue
            if self._wanted(record.at):
                self._seen(record.at)
                yield record


@dataclass
class CaptureRead:
    """Every record read from a capture prefix (a list: for small prefixes and tests; the monitor streams)."""

    records: list[CaptureRecord]
    problems: list[str]
    files: int


def read_capture(storage: Storage, prefix_uri: str, after: dt.datetime | None = None) -> CaptureRead:
    """Every record under ``prefix_uri`` later than ``after``, sorted by time; see :class:`CaptureReader`."""
    reader = CaptureReader(storage, prefix_uri, after)
    records = sorted(reader, key=lambda record: record.at)
    return CaptureRead(records, reader.problems, reader.files)
