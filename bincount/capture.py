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

Files: ``<artifact_root>/data-capture/<endpoint>/<variant>/yyyy/mm/dd/hh/<mm-ss-mmm>-<uuid>.jsonl``,
a new file each hour and past ``max_file_bytes``. Images: request bodies up to
``max_inline_bytes`` are kept whole (base64 inline); bigger ones as a JPEG thumbnail of at most
``THUMBNAIL_PX`` px a side (``bincount.input = "thumbnail"``), so capture stays near the size of
the photos themselves and the monitor's input statistics still have pixels to read.

The writer never slows or fails a request: :meth:`CaptureWriter.offer` puts the raw bytes on a
bounded queue (or counts a drop when it is full) and one thread encodes and writes them.
:meth:`CaptureWriter.close` writes what is queued, then closes (and on ``s3://`` uploads) the file.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import json
import logging
import queue
import random
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image

from bincount.contracts.serving import CaptureConfig
from bincount.storage import Storage, StorageError, join_uri, local_path

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
    """What a writer did; ``dropped``: not sampled in because the queue was full; ``failed``: lost to write errors."""

    offered: int = 0
    captured: int = 0
    dropped: int = 0
    failed: int = 0
    files: int = 0
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class CaptureWriter:
    """Samples exchanges into a bounded queue; one thread writes them as rolled JSON Lines files under ``prefix_uri``.

    On ``file://`` files are written in place (a reader may see the file grow); on ``s3://`` each file is
    staged locally and uploaded when it rolls (hourly, by size, and on close).
    """

    def __init__(self, prefix_uri: str, config: CaptureConfig, storage: Storage, staging: Path | None = None) -> None:
        self.prefix_uri = prefix_uri.rstrip("/")
        self.config = config
        self.storage = storage
        self.stats = CaptureStats()
        self._staging = staging  # s3:// only: made on first use when not given, removed on close once empty
        self._owns_staging = staging is None
        self._queue: queue.Queue[Exchange | None] = queue.Queue(maxsize=config.queue_size)
        self._file: IO[bytes] | None = None
        self._file_path: Path | None = None
        self._file_uri: str | None = None
        self._file_hour: str | None = None
        self._file_bytes = 0
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

    def close(self, timeout_s: float = 60.0) -> None:
        """Write everything queued, close the current file (upload it on ``s3://``), stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.error(
                "capture writer did not finish within %.0f s; %d records still queued", timeout_s, self._queue.qsize()
            )
        elif self._owns_staging and self._staging is not None:
            for folder in [*(path for path in self._staging.iterdir() if path.is_dir()), self._staging]:
                with contextlib.suppress(OSError):  # not empty: a file that did not upload stays, the only copy
                    folder.rmdir()

    def _run(self) -> None:
        while (exchange := self._queue.get()) is not None:
            try:
                self._write(exchange)
                self.stats.captured += 1
            except (OSError, StorageError, ValueError) as error:
                self.stats.failed += 1
                self.stats.last_error = f"{type(error).__name__}: {error}"
                logger.error("capture record lost: %s", self.stats.last_error)
        try:
            self._roll()
        except (OSError, StorageError) as error:
            self.stats.last_error = f"{type(error).__name__}: {error}"
            logger.error("last capture file not stored: %s", self.stats.last_error)

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

    def _open(self, hour: str, at: dt.datetime) -> None:
        name = f"{at.astimezone(dt.UTC).strftime('%M-%S-%f')[:-3]}-{uuid.uuid4().hex[:12]}.jsonl"
        self._file_uri = join_uri(self.prefix_uri, hour, name)
        if self._file_uri.startswith("file://"):
            self._file_path = local_path(self._file_uri)
        else:
            if self._staging is None:
                self._staging = Path(tempfile.mkdtemp(prefix="bincount-capture-"))
            self._file_path = self._staging / hour.replace("/", "-") / name
        self._file_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._file_path.open("ab")
        self._file_hour, self._file_bytes = hour, 0
        self.stats.files += 1

    def _roll(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if not self._file_uri or self._file_uri.startswith("file://"):
            return
        assert self._file_path is not None
        self.storage.upload_file(self._file_path, self._file_uri)
        self._file_path.unlink(missing_ok=True)


# reading ----------------------------------------------------------------------------------------------------


@dataclass
class CaptureRead:
    """Records read from a capture prefix, and what was skipped with why (never raised: one bad file hides nothing)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    files: int = 0


def _hour_of(relative: str) -> str | None:
    """``yyyy/mm/dd/hh`` of a capture file's relative path, or None when it is not laid out like one."""
    parts = relative.split("/")
    if len(parts) != 5 or not all(part.isdigit() for part in parts[:4]):
        return None
    return "/".join(parts[:4])


def read_capture(storage: Storage, prefix_uri: str, after: str | None = None) -> CaptureRead:
    """Every record under ``prefix_uri`` with ``inferenceTime`` later than ``after`` (ISO, as written).

    Foreign files, unparseable lines (a truncated last line of a file still being written) and records
    of a newer ``eventVersion`` are skipped and listed in ``problems``.
    """
    result = CaptureRead()
    base = prefix_uri.rstrip("/") + "/"
    after_hour = after[:13].replace("-", "/").replace("T", "/") if after else None
    for info in storage.list(prefix_uri):
        relative = info.uri[len(base) :]
        hour = _hour_of(relative)
        if hour is None or not relative.endswith(".jsonl"):
            result.problems.append(f"{relative}: not a capture file (expected yyyy/mm/dd/hh/<name>.jsonl): skipped")
            continue
        if after_hour and hour < after_hour:
            continue
        result.files += 1
        lines = storage.read_bytes(info.uri).decode(errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                version = str(record.get("eventVersion", EVENT_VERSION))
                time = record["eventMetadata"]["inferenceTime"]
            except (ValueError, KeyError, TypeError, AttributeError):
                last = " (the last line: a file still being written, or cut short)" if number == len(lines) else ""
                result.problems.append(f"{relative} line {number}: not a capture record{last}: skipped")
                continue
            if version != EVENT_VERSION:
                result.problems.append(
                    f"{relative} line {number}: eventVersion {version} is newer than this reader's "
                    f"({EVENT_VERSION}): skipped"
                )
                continue
            if after is None or time > after:
                result.records.append(record)
    result.records.sort(key=lambda record: record["eventMetadata"]["inferenceTime"])
    return result


def iter_sampled_images(records: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(record, image bytes) for each record whose input was kept (inline or as a thumbnail)."""
    for record in records:
        part = record["captureData"]["endpointInput"]
        if part.get("encoding") == "BASE64" and part.get("data"):
            yield record, base64.b64decode(part["data"])
