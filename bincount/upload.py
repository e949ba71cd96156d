"""Sync each split to its channel (``<channels>/<split>/<label>/<id>.jpg``), copying only what changed.

A sync also removes what no longer belongs to a channel, so an image that moved to another
split never stays behind on two sides. Memory: the channel's listing and the split table (a few hundred
bytes an image) and at most ``2 * concurrency`` copies in flight, whatever the number of images.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bincount.download import bounded_map, image_path
from bincount.storage import ObjectInfo, Storage, file_digest, join_uri, local_path


@dataclass
class SyncReport:
    channels_uri: str
    copied: int = 0
    unchanged: int = 0
    deleted: int = 0


def _unchanged(existing: ObjectInfo | None, source: Path, sha256: str) -> bool:
    if existing is None or existing.size != source.stat().st_size:
        return False
    if existing.md5 is not None:
        return existing.md5 == file_digest(source, "md5")
    if existing.uri.startswith("file://"):
        return file_digest(local_path(existing.uri)) == sha256
    return False  # multipart S3 object: no cheap checksum to compare, copy again


def sync_channels(
    split_table: pd.DataFrame, local_dir: Path, storage: Storage, channels_uri: str, concurrency: int = 16
) -> SyncReport:
    """Make ``channels_uri`` hold exactly the split's images."""
    report = SyncReport(channels_uri=channels_uri)
    existing = {info.uri: info for info in storage.list(channels_uri)}
    wanted: set[str] = set()

    def copy_if_changed(row: tuple[str, str, int, str]) -> bool:
        image_id, split, label, sha256 = row
        uri = join_uri(channels_uri, split, str(label), f"{image_id}.jpg")
        source = image_path(local_dir, image_id)
        if _unchanged(existing.get(uri), source, sha256):
            return False
        storage.upload_file(source, uri)
        return True

    rows = split_table[["id", "split", "label", "sha256"]].itertuples(index=False, name=None)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="upload") as pool:
        for (image_id, split, label, _), future in bounded_map(pool, copy_if_changed, rows, 2 * concurrency):
            wanted.add(join_uri(channels_uri, split, str(label), f"{image_id}.jpg"))
            if future.result():
                report.copied += 1
            else:
                report.unchanged += 1
        stale = (uri for uri in existing if uri not in wanted)
        for _, future in bounded_map(pool, storage.delete, stale, 2 * concurrency):
            future.result()
            report.deleted += 1
    return report
