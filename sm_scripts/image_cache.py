"""A channel decoded once into a memory-mapped uint8 file: bounded memory at any channel size.

One file per channel and image size, ``<cache-dir>/<channel>-<size>px-<key>.u8``::

    MAGIC (8 bytes) | header length (8 bytes) | header JSON | padding to 4096
    labels: int64 [N] | padding to 4096 | images: uint8 [N, 3, S, S]

The header records the image size, the count, the classes and a fingerprint of the channel's files
(relative name, label, size and mtime of each, and the preprocessing code), so a changed channel, or
code that resizes another way, finds the cache stale and rebuilds it. The build streams: images are
decoded a chunk at a time, written to a temporary file and renamed into place, so neither a crash
nor a second process ever sees half a cache; data-parallel processes on one host take a file lock
in turn, so the first builds and the others open what it built. A cache that is truncated or whose
header does not read is rebuilt with a line that says why.

Reading maps the file; the pages a batch touches stay in the page cache (the next epoch reads them
from memory), and :meth:`MappedImages.release`, called after every batch, unmaps them from this
process, so its resident memory stays flat however large the channel. (A fault maps more than the
row asked for: read-around, fault-around, and on recent kernels a whole large folio of up to 2 MB,
so one batch of 64 may map some 90 MB until it is released; that much, and no more, at any size.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from sm_scripts import preprocessing
from sm_scripts.errors import TrainingError
from sm_scripts.preprocessing import ImageError, load_image

MAGIC = b"SMIMGC01"
ALIGN = 4096
CHUNK_BYTES = 16 << 20  # decoded pixels held at once while building


@dataclass(frozen=True)
class Layout:
    """Where the labels and images lie in a cache file of ``count`` images of ``image_size`` px."""

    count: int
    image_size: int
    labels_at: int = ALIGN

    @property
    def image_bytes(self) -> int:
        return 3 * self.image_size * self.image_size

    @property
    def images_at(self) -> int:
        return _aligned(self.labels_at + 8 * self.count)

    @property
    def total(self) -> int:
        return self.images_at + self.count * self.image_bytes


class MappedImages:
    """A cache file's images as a (N, 3, S, S) uint8 tensor over a private read mapping of the file."""

    def __init__(self, path: Path, layout: Layout) -> None:
        with path.open("rb") as file:
            # Private and writable, so torch gets a writable array; nothing writes it, so every page is the file's.
            self._map = mmap.mmap(file.fileno(), layout.total, flags=mmap.MAP_PRIVATE)
        pixels = np.frombuffer(self._map, np.uint8, layout.count * layout.image_bytes, layout.images_at)
        self.images = torch.from_numpy(pixels).view(layout.count, 3, layout.image_size, layout.image_size)
        self.labels = torch.from_numpy(np.frombuffer(self._map, np.int64, layout.count, layout.labels_at).copy())
        self.path = path

    def release(self) -> None:
        """Unmap the pages read so far from this process (they stay in the page cache: reading them again
        costs a page fault, not a disk read)."""
        self._map.madvise(mmap.MADV_DONTNEED)


def fingerprint(files: list[str], labels: list[int], classes: list[str], image_size: int) -> str:
    """The channel as the cache holds it: each file's path, label, size and mtime, and how it was resized."""
    digest = hashlib.sha256()
    code = Path(preprocessing.__file__).read_bytes()
    digest.update(json.dumps([MAGIC.decode(), image_size, classes, hashlib.sha256(code).hexdigest()]).encode())
    for path, label in zip(files, labels, strict=True):
        stat = os.stat(path)
        digest.update(f"{path}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_file(cache_dir: Path, root: Path, image_size: int) -> Path:
    """The cache file of the channel at ``root`` (by its absolute path) at ``image_size`` px."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return cache_dir / f"{root.name}-{image_size}px-{key}.u8"


def read_header(path: Path) -> dict[str, Any]:
    """The header of the cache file at ``path``; raises ValueError when it is not a whole cache file."""
    with path.open("rb") as file:
        if file.read(len(MAGIC)) != MAGIC:
            raise ValueError("it does not start with the cache format's magic bytes")
        length = int.from_bytes(file.read(8), "little")
        if not 0 < length < ALIGN:
            raise ValueError(f"its header length {length} is not a cache header's")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"its header is not JSON ({error})") from None
    layout = Layout(int(header["count"]), int(header["image_size"]))
    size = path.stat().st_size
    if size != layout.total:
        raise ValueError(f"it holds {size} bytes where {header['count']} images need {layout.total}: truncated")
    return header


def write_header(file: BinaryIO, header: dict[str, Any]) -> None:
    body = json.dumps(header).encode()
    file.write(MAGIC + len(body).to_bytes(8, "little") + body)
    file.write(b"\0" * (ALIGN - file.tell()))


def decoded_chunks(files: list[str], image_size: int, threads: int) -> Iterator[np.ndarray]:
    """The files decoded and resized, in order, as (n, 3, S, S) uint8 arrays of at most ``CHUNK_BYTES``."""
    chunk = np.empty((max(threads, CHUNK_BYTES // (3 * image_size * image_size)), 3, image_size, image_size), np.uint8)

    def load(path: str) -> torch.Tensor:
        try:
            return load_image(Path(path).read_bytes(), image_size)
        except ImageError as error:
            raise TrainingError(f"cannot decode image {path}: {error}") from error

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(files), len(chunk)):
            part = files[start : start + len(chunk)]
            for index, image in enumerate(pool.map(load, part)):
                chunk[index] = image.numpy()
            yield chunk[: len(part)]


def build(path: Path, header: dict[str, Any], files: list[str], labels: list[int], threads: int) -> None:
    """Decode ``files`` into a new cache file at ``path``, written beside it and renamed into place."""
    layout = Layout(len(files), header["image_size"])
    free = shutil.disk_usage(path.parent).free
    if free < layout.total:
        raise TrainingError(
            f"the image cache of {len(files)} images at {layout.image_size}px needs {layout.total / 1e9:.2f} GB "
            f"and {path.parent} has {free / 1e9:.2f} GB free: point --data-cache-dir at a larger volume"
        )
    handle, temporary = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write_header(file, header)
            file.write(np.asarray(labels, dtype=np.int64).tobytes())
            file.write(b"\0" * (layout.images_at - file.tell()))
            for chunk in decoded_chunks(files, layout.image_size, threads):
                file.write(chunk.data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold ``path``'s lock file: the processes of a data-parallel run check and build a cache one at a time."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_cache(
    root: Path,
    files: list[str],
    labels: list[int],
    classes: list[str],
    image_size: int,
    *,
    threads: int,
    cache_dir: Path,
) -> MappedImages:
    """The channel's cache in ``cache_dir``: reused when its fingerprint matches, built (or rebuilt) otherwise."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_file(cache_dir, root, image_size)
    header = {
        "image_size": image_size,
        "count": len(files),
        "classes": classes,
        "channel": str(root),
        "fingerprint": fingerprint(files, labels, classes, image_size),
    }
    with locked(path):
        problem = stale_or_unreadable(path, header)
        if problem is not None:
            print(f"image cache {path} {problem}: decoding the {len(files)} images of {root} into it", flush=True)
            build(path, header, files, labels, threads)
    return MappedImages(path, Layout(len(files), image_size))


def stale_or_unreadable(path: Path, header: dict[str, Any]) -> str | None:
    """Why the cache file at ``path`` cannot serve ``header``'s channel, or None when it can."""
    if not path.exists():
        return "does not exist yet"
    try:
        found = read_header(path)
    except (ValueError, KeyError) as error:
        return f"is unreadable ({error}), so it is rebuilt"
    if found != header:
        return "is stale (the channel or the preprocessing changed), so it is rebuilt"
    return None


def open_private(files: list[str], labels: list[int], image_size: int, threads: int) -> MappedImages:
    """A cache no other open reuses: built in a temporary file that is deleted as soon as it is mapped
    (the disk space comes back when the mapping goes)."""
    with tempfile.TemporaryDirectory(prefix="image-cache-") as scratch:
        path = Path(scratch) / "channel.u8"
        build(path, {"image_size": image_size, "count": len(files)}, files, labels, threads)
        return MappedImages(path, Layout(len(files), image_size))


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN
