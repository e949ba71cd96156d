"""Task: sync each split to its training channel, copying only what changed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from bincount.config import Settings
from bincount.storage import storage_for
from bincount.upload import SyncReport, sync_channels
from tasks.retry import is_transient


@task(
    name="upload-channels",
    retries=3,
    retry_delay_seconds=[10, 30, 90],
    retry_jitter_factor=0.5,
    retry_condition_fn=is_transient,
    cache_policy=NO_CACHE,  # never trust a cache here: an unchanged sync only lists and compares checksums
)
def upload_channels_task(settings: Settings, split_table: pd.DataFrame, channels_uri: str) -> SyncReport:
    """Make ``channels_uri/<split>/<label>/<id>.jpg`` match the split table."""
    logger = get_run_logger()
    logger.info("Syncing %d images to %s", len(split_table), channels_uri)
    report = sync_channels(split_table, Path(settings.data_dir), storage_for(settings), channels_uri)
    logger.info("Copied %d, unchanged %d, deleted %d", report.copied, report.unchanged, report.deleted)
    return report
