"""Task: split the downloaded images into train/valid/test and write the split manifest."""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from bincount.config import Settings
from bincount.download import DownloadedImage
from bincount.manifest import Manifest
from bincount.split import read_split, split_dataset, write_split
from bincount.storage import ObjectNotFoundError, storage_for
from tasks.retry import is_transient


@task(
    name="split-dataset",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=is_transient,
    cache_policy=INPUTS + TASK_SOURCE,
    persist_result=True,
)
def split_dataset_task(
    settings: Settings,
    manifest: Manifest,
    downloaded: dict[str, DownloadedImage],
    split_uri: str,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pd.DataFrame:
    """Split (stratified, seeded), keeping every image of the split already at ``split_uri`` on its side;
    written as CSV at ``split_uri``."""
    logger = get_run_logger()
    storage = storage_for(settings)
    try:
        previous = read_split(storage, split_uri)
    except ObjectNotFoundError:
        previous = None
    table = split_dataset(manifest, downloaded, settings.source_uri, fractions=fractions, seed=seed, previous=previous)
    write_split(table, storage, split_uri)
    sizes = table["split"].value_counts().reindex(["train", "valid", "test"]).to_dict()
    kept = 0 if previous is None else int(table["id"].isin(previous["id"]).sum())
    logger.info(
        "Split %d images %s (seed %d) into %s: %d kept their side from the previous split, %d placed anew",
        len(table),
        sizes,
        seed,
        split_uri,
        kept,
        len(table) - kept,
    )
    return table
