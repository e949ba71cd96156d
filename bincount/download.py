"""Download the images (and metadata) of a manifest into a local mirror of the bucket.

Concurrent (a bounded thread pool over one shared S3 client), resumable (a ledger records each
file that arrived whole and decoded; a re-run checks those against their SHA-256 and skips them),
atomic (a file appears under its final name complete or not at all) and constant in memory
whatever the manifest size (at most ``concurrency`` downloads are in flight, and each streams to
disk, a photo at a time). Missing objects, objects the store refuses (403) and bytes that are not a
whole JPEG or PNG of sane size are listed, and so are objects over ``max_object_bytes`` (their
stated size is checked before any byte is held, and a body that streams past the cap anyway is
dropped there); the run fails only when they pass ``max_missing_share`` of the manifest. One run
at a time per folder: a lock file names the run that holds it.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from bincount.ids import check_image_id
from bincount.manifest import Manifest, image_uri, metadata_uri
from bincount.storage import (
    ObjectNotFoundError,
    ObjectTooLargeError,
    Storage,
    StorageError,
    TransientStorageError,
    atomic_write_bytes,
    file_digest,
    file_lock,
)

LEDGER_NAME = "downloaded.jsonl"
LOCK_NAME = ".download.lock"
IMAGE_FORMATS = ("JPEG", "PNG")
MAX_IMAGE_PIXELS = 16_000_000  # as the endpoint's limit (sm_scripts/inference.py): far above any bin photo
MAX_OBJECT_BYTES = 50_000_000  # one photo; ABID's are tens of kilobytes, so a larger object is not a bin photo

Item = TypeVar("Item")
Result = TypeVar("Result")
ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` from the calling thread."""


class DownloadError(RuntimeError):
    """Too much of the manifest could not be downloaded; the message lists what and why."""


@dataclass(frozen=True)
class DownloadedImage:
    image_id: str
    sha256: str
    size: int


@dataclass
class DownloadReport:
    """What a download run did; plain values only, so Prefect can cache and show it."""

    source_uri: str
    local_dir: str
    requested: int
    downloaded: int = 0
    already_present: int = 0
    bytes_downloaded: int = 0
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)  # bytes that are not a usable JPEG or PNG
    unreadable: dict[str, str] = field(default_factory=dict)  # objects the store would not give (403, over the cap)

    @property
    def unusable_share(self) -> float:
        unusable = len(self.missing) + len(self.corrupt) + len(self.unreadable)
        return unusable / self.requested if self.requested else 0.0


def image_path(local_dir: Path, image_id: str) -> Path:
    return local_dir / "bin-images" / f"{check_image_id(image_id)}.jpg"


def check_image(data: bytes) -> tuple[int, int]:
    """Decode a JPEG or PNG and return its ``(width, height)``.

    A JPEG is decoded at 1/8 scale (every scan is still read, so truncation and corruption are
    caught, at about half the cost of a full decode). Sizes are checked before decoding, so a
    decompression bomb is refused without being expanded.

    Raises:
        ValueError: the bytes are not a JPEG or PNG, are truncated or corrupt, or hold more
            than ``MAX_IMAGE_PIXELS`` pixels.
    """
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            size = image.size
            if size[0] * size[1] > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"is {size[0]}x{size[1]} pixels, over the {MAX_IMAGE_PIXELS} limit (a decompression bomb?)"
                )
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
            return size
    except UnidentifiedImageError:
        raise ValueError("is not a JPEG or PNG (only those are accepted)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"does not decode as an image: {error}") from None


class Ledger:
    """Append-only record of the files that arrived whole and decoded, one JSON line each."""

    def __init__(self, local_dir: Path) -> None:
        self.path = local_dir / LEDGER_NAME

    def read(self) -> dict[str, DownloadedImage]:
        entries: dict[str, DownloadedImage] = {}
        if not self.path.is_file():
            return entries
        for line in self.path.read_text().splitlines():
            try:
                entry = DownloadedImage(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue  # a line cut short by a killed run: its file is verified again
            entries[entry.image_id] = entry
        return entries

    @contextmanager
    def appender(self) -> Iterator[Callable[[DownloadedImage], None]]:
        """A function that records one entry, written through at once (a kill loses at most one line)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", buffering=1) as handle:
            yield lambda entry: handle.write(json.dumps(entry.__dict__) + "\n")


def verify_existing(local_dir: Path, image_id: str, entry: DownloadedImage | None) -> DownloadedImage | None:
    """The verified record of an image already on disk, or None when it must be fetched.

    A file under its final name arrived whole (writes are atomic); with a ledger entry it is
    checked against the recorded SHA-256, without one (the run was killed before recording it)
    it is decoded once more and adopted.
    """
    path = image_path(local_dir, image_id)
    if not path.is_file():
        return None
    if entry is not None:
        return entry if path.stat().st_size == entry.size and file_digest(path) == entry.sha256 else None
    data = path.read_bytes()
    try:
        check_image(data)
    except ValueError:
        return None
    return DownloadedImage(image_id=image_id, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _fetch_one(
    storage: Storage, source_uri: str, local_dir: Path, image_id: str, with_metadata: bool, max_object_bytes: int
) -> DownloadedImage:
    """Fetch metadata then image (so an image on disk always has its metadata); only an image
    that decodes is written, and it appears whole under its name or not at all. Memory stays
    bounded: at most ``max_object_bytes`` per download in flight."""
    if with_metadata:
        storage.download_file(metadata_uri(source_uri, image_id), local_dir / "metadata" / f"{image_id}.json")
    try:
        data = storage.read_bytes(image_uri(source_uri, image_id), max_bytes=max_object_bytes)
    except ObjectTooLargeError as error:
        raise ObjectTooLargeError(
            f"{error}. A bin photo is far smaller: remove the id from the manifest, or raise max_object_bytes "
            "if the object is a genuine photo"
        ) from None
    check_image(data)
    atomic_write_bytes(image_path(local_dir, image_id), data)
    return DownloadedImage(image_id=image_id, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def bounded_map(
    pool: ThreadPoolExecutor, function: Callable[[Item], Result], items: Iterable[Item], limit: int
) -> Iterator[tuple[Item, Future[Result]]]:
    """Like ``pool.map`` but with at most ``limit`` tasks queued, yielding ``(item, future)`` as they finish
    (``pool.map`` submits every item at once: a future per item, held until the end)."""
    pending: dict[Future[Result], Item] = {}
    for item in items:
        pending[pool.submit(function, item)] = item
        if len(pending) >= limit:  # a slot frees before the next item is taken
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            yield pending.pop(future), future


def download_images(
    manifest: Manifest,
    source_uri: str,
    local_dir: Path,
    storage: Storage,
    concurrency: int = 32,
    max_missing_share: float = 0.01,
    with_metadata: bool = True,
    progress: ProgressCallback | None = None,
    lock_wait_s: float | None = 3600.0,
    max_object_bytes: int = MAX_OBJECT_BYTES,
) -> tuple[DownloadReport, dict[str, DownloadedImage]]:
    """Mirror the manifest's images from ``source_uri`` into ``local_dir``.

    An image object over ``max_object_bytes`` is not held: it is listed as unreadable (with its key and
    the cap) and the rest of the download goes on.

    Returns:
        The report, and the verified files by id (for the split manifest's checksums).

    Raises:
        DownloadError: more than ``max_missing_share`` of the manifest is missing, unreadable or corrupt.
        LockedError: another run kept ``local_dir`` for more than ``lock_wait_s`` seconds.
        TransientStorageError: the store kept failing after retries (safe to run again: what
            arrived is kept).
    """
    with file_lock(local_dir / LOCK_NAME, wait_s=lock_wait_s):
        return _download_locked(
            manifest,
            source_uri,
            local_dir,
            storage,
            concurrency=concurrency,
            max_missing_share=max_missing_share,
            with_metadata=with_metadata,
            progress=progress,
            max_object_bytes=max_object_bytes,
        )


def _download_locked(
    manifest: Manifest,
    source_uri: str,
    local_dir: Path,
    storage: Storage,
    *,
    concurrency: int,
    max_missing_share: float,
    with_metadata: bool,
    progress: ProgressCallback | None,
    max_object_bytes: int,
) -> tuple[DownloadReport, dict[str, DownloadedImage]]:
    started = time.perf_counter()
    for leftover in local_dir.glob("*/.tmp-*"):  # what a killed run was writing (no live run writes now)
        leftover.unlink()
    ledger = Ledger(local_dir)
    report = DownloadReport(source_uri=source_uri, local_dir=str(local_dir), requested=len(manifest))
    verified: dict[str, DownloadedImage] = {}
    done = 0

    def tick() -> None:
        if progress:
            progress(done, report.requested)

    def fetch(image_id: str) -> DownloadedImage:
        return _fetch_one(storage, source_uri, local_dir, image_id, with_metadata, max_object_bytes)

    with ledger.appender() as record:
        to_fetch = _keep_verified(manifest, ledger.read(), local_dir, record, verified, report)
        done = report.already_present
        tick()
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="download") as pool:
            for image_id, future in bounded_map(pool, fetch, to_fetch, limit=2 * concurrency):
                entry = _outcome(image_id, future, report)
                if entry is not None:
                    record(entry)
                    verified[image_id] = entry
                done += 1
                tick()
    report.seconds = time.perf_counter() - started
    report.missing.sort()
    if report.unusable_share > max_missing_share:
        raise DownloadError(_failure_message(report, max_missing_share))
    return report, verified


def _keep_verified(
    manifest: Manifest,
    known: dict[str, DownloadedImage],
    local_dir: Path,
    record: Callable[[DownloadedImage], None],
    verified: dict[str, DownloadedImage],
    report: DownloadReport,
) -> list[str]:
    """Keep every image already here and whole (recording it if the ledger lacks it); return the rest."""
    to_fetch = []
    for image_id in manifest:
        entry = known.get(image_id)
        present = verify_existing(local_dir, image_id, entry)
        if present is None:
            to_fetch.append(image_id)
            continue
        if entry is None:
            record(present)
        verified[image_id] = present
        report.already_present += 1
    return to_fetch


def _outcome(image_id: str, future: Future[DownloadedImage], report: DownloadReport) -> DownloadedImage | None:
    """The fetched image, or None with the reason listed in ``report`` (a transient store error is raised)."""
    try:
        entry = future.result()
    except TransientStorageError:
        raise  # the store, not this object: a retry of the run resumes here
    except ObjectNotFoundError:
        report.missing.append(image_id)
    except StorageError as error:
        report.unreadable[image_id] = str(error)
    except ValueError as error:
        report.corrupt[image_id] = str(error)
    else:
        report.downloaded += 1
        report.bytes_downloaded += entry.size
        return entry
    return None


def _failure_message(report: DownloadReport, max_missing_share: float) -> str:
    examples = ", ".join(report.missing[:5]) or "none"
    corrupt = "; ".join(f"{image_id}: {why}" for image_id, why in list(report.corrupt.items())[:5]) or "none"
    unreadable = "; ".join(f"{image_id}: {why}" for image_id, why in list(report.unreadable.items())[:5]) or "none"
    return (
        f"{len(report.missing)} missing, {len(report.unreadable)} unreadable and {len(report.corrupt)} corrupt "
        f"of {report.requested} images ({report.unusable_share:.1%}) is more than "
        f"max_missing_share={max_missing_share:.1%}. "
        f"Missing (first 5): {examples}. Unreadable (first 5): {unreadable}. Corrupt (first 5): {corrupt}. "
        f"Check source_uri={report.source_uri} and the manifest, or raise max_missing_share to accept the gaps; "
        f"the {report.downloaded + report.already_present} good images are kept and will not be fetched again."
    )
