"""Download the images (and metadata) of a manifest into a local mirror of the bucket.

Concurrent (a bounded thread pool over one shared S3 client), resumable (a ledger records each
file that arrived whole and decoded; a re-run checks those against their SHA-256 and skips them),
atomic (a file appears under its final name complete or not at all) and constant in memory
whatever the manifest size (at most ``concurrency`` downloads are in flight, and each streams to
disk, a photo at a time). Missing objects and images that do not decode are listed; the run fails only when they
pass ``max_missing_share`` of the manifest.
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

from PIL import Image, UnidentifiedImageError

from bincount.manifest import Manifest, image_uri, metadata_uri
from bincount.storage import ObjectNotFoundError, Storage, atomic_write_bytes, file_digest

LEDGER_NAME = "downloaded.jsonl"

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
    corrupt: dict[str, str] = field(default_factory=dict)

    @property
    def unusable_share(self) -> float:
        return (len(self.missing) + len(self.corrupt)) / self.requested if self.requested else 0.0


def image_path(local_dir: Path, image_id: str) -> Path:
    return local_dir / "bin-images" / f"{image_id}.jpg"


def check_image(data: bytes) -> tuple[int, int]:
    """Decode an encoded image and return its ``(width, height)``.

    A JPEG is decoded at 1/8 scale (every scan is still read, so truncation and corruption are
    caught, at about half the cost of a full decode).

    Raises:
        ValueError: the file is not an image, or is truncated or corrupt.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
            return size
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
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
    storage: Storage, source_uri: str, local_dir: Path, image_id: str, with_metadata: bool
) -> DownloadedImage:
    """Fetch metadata then image (so an image on disk always has its metadata); only an image
    that decodes is written, and it appears whole under its name or not at all."""
    if with_metadata:
        storage.download_file(metadata_uri(source_uri, image_id), local_dir / "metadata" / f"{image_id}.json")
    data = storage.read_bytes(image_uri(source_uri, image_id))  # photos are small: memory stays bounded by concurrency
    check_image(data)
    atomic_write_bytes(image_path(local_dir, image_id), data)
    return DownloadedImage(image_id=image_id, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _bounded_map(
    pool: ThreadPoolExecutor, function: Callable[[str], DownloadedImage], items: Iterable[str], limit: int
) -> Iterator[tuple[str, Future]]:
    """Like ``pool.map`` but with at most ``limit`` tasks queued, yielding as they finish."""
    pending: dict[Future, str] = {}
    for item in items:
        if len(pending) >= limit:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future
        pending[pool.submit(function, item)] = item
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
) -> tuple[DownloadReport, dict[str, DownloadedImage]]:
    """Mirror the manifest's images from ``source_uri`` into ``local_dir``.

    Returns:
        The report, and the verified files by id (for the split manifest's checksums).

    Raises:
        DownloadError: more than ``max_missing_share`` of the manifest is missing or corrupt.
        TransientStorageError: the store kept failing after retries (safe to run again: what
            arrived is kept).
    """
    started = time.perf_counter()
    local_dir.mkdir(parents=True, exist_ok=True)
    for leftover in local_dir.glob("*/.tmp-*"):  # what a killed run was writing
        leftover.unlink()
    ledger = Ledger(local_dir)
    known = ledger.read()
    report = DownloadReport(source_uri=source_uri, local_dir=str(local_dir), requested=len(manifest))
    verified: dict[str, DownloadedImage] = {}
    done = 0

    def tick() -> None:
        if progress:
            progress(done, report.requested)

    to_fetch = []
    with ledger.appender() as record:
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
            done += 1
        tick()

        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="download") as pool:
            fetch = lambda image_id: _fetch_one(storage, source_uri, local_dir, image_id, with_metadata)  # noqa: E731
            for image_id, future in _bounded_map(pool, fetch, to_fetch, limit=2 * concurrency):
                try:
                    entry = future.result()
                except ObjectNotFoundError:
                    report.missing.append(image_id)
                except ValueError as error:
                    report.corrupt[image_id] = str(error)
                else:
                    record(entry)
                    verified[image_id] = entry
                    report.downloaded += 1
                    report.bytes_downloaded += entry.size
                done += 1
                tick()
    report.seconds = time.perf_counter() - started
    report.missing.sort()
    if report.unusable_share > max_missing_share:
        raise DownloadError(_failure_message(report, max_missing_share))
    return report, verified


def _failure_message(report: DownloadReport, max_missing_share: float) -> str:
    examples = ", ".join(report.missing[:5]) or "none"
    corrupt = "; ".join(f"{image_id}: {why}" for image_id, why in list(report.corrupt.items())[:5]) or "none"
    return (
        f"{len(report.missing)} missing and {len(report.corrupt)} corrupt of {report.requested} images "
        f"({report.unusable_share:.1%}) is more than max_missing_share={max_missing_share:.1%}. "
        f"Missing (first 5): {examples}. Corrupt (first 5): {corrupt}. "
        f"Check source_uri={report.source_uri} and the manifest, or raise max_missing_share to accept the gaps; "
        f"the {report.downloaded + report.already_present} good images are kept and will not be fetched again."
    )
