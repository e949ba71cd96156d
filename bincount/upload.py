"""Sync each split to its channel (``<channels>/<split>/<label>/<id>.jpg``), copying only what changed.

A sync also removes what no longer belongs to a channel, so an image that moved to another
split never stays behind on two sides.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bincount.download import image_path
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
    wanted: dict[str, tuple[Path, str]] = {
        join_uri(channels_uri, row.split, str(row.label), f"{row.id}.jpg"): (image_path(local_dir, row.id), row.sha256)
        for row in split_table.itertuples()
    }
    to_copy = [
        (source, uri) for uri, (source, sha256) in wanted.items() if not _unchanged(existing.get(uri), source, sha256)
    ]
    stale = [uri for uri in existing if uri not in wanted]
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="upload") as pool:
        list(pool.map(lambda job: storage.upload_file(*job), to_copy))
        list(pool.map(storage.delete, stale))
    report.copied, report.deleted = len(to_copy), len(stale)
    report.unchanged = len(wanted) - len(to_copy)
    return report
