"""Task: split the downloaded images into train/valid/test against the dataset's placement record.

Not cached: the split depends on the dataset's placement record (which other runs append to), and
every run writes its own view to ``split.csv``; both take a listing and a few small reads.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from bincount.config import Settings
from bincount.download import DownloadedImage
from bincount.manifest import Manifest
from bincount.split import SplitView, record_split
from bincount.storage import storage_for
from tasks.retry import is_transient


@task(name="split-dataset", retries=2, retry_delay_seconds=10, retry_condition_fn=is_transient, cache_policy=NO_CACHE)
def split_dataset_task(
    settings: Settings,
    manifest: Manifest,
    downloaded: dict[str, DownloadedImage],
    dataset_uri: str,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> SplitView:
    """Split (stratified, seeded), every id the dataset ever placed on its side; record the new placements
    under ``dataset_uri/placements/`` and write this run's view as ``dataset_uri/split.csv``."""
    logger = get_run_logger()
    view = record_split(
        storage_for(settings), dataset_uri, manifest, downloaded, settings.source_uri, fractions=fractions, seed=seed
    )
    logger.info("%s", view.summary(dataset_uri, seed))
    return view
