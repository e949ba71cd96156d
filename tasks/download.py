"""Task: mirror the manifest's images from the source bucket into the local data folder."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from tqdm import tqdm

from bincount.config import Settings
from bincount.download import MAX_OBJECT_BYTES, DownloadedImage, DownloadReport, download_images
from bincount.manifest import Manifest
from bincount.storage import storage_for
from tasks.artifacts import ProgressArtifact
from tasks.retry import is_transient


@task(
    name="download-images",
    retries=3,
    retry_delay_seconds=[10, 30, 90],
    retry_jitter_factor=0.5,
    retry_condition_fn=is_transient,
    cache_policy=INPUTS + TASK_SOURCE,
    persist_result=True,
)
def download_images_task(
    settings: Settings,
    manifest: Manifest,
    concurrency: int = 32,
    max_missing_share: float = 0.01,
    max_object_bytes: int = MAX_OBJECT_BYTES,
) -> tuple[DownloadReport, dict[str, DownloadedImage]]:
    """Download every image of ``manifest`` into ``settings.data_dir`` (resumable; see bincount.download);
    an object over ``max_object_bytes`` is listed, never held."""
    logger = get_run_logger()
    local_dir = Path(settings.data_dir)
    logger.info(
        "Downloading %d images from %s to %s (%d at a time)", len(manifest), settings.source_uri, local_dir, concurrency
    )
    progress_artifact = ProgressArtifact("download-progress", f"Images downloaded from {settings.source_uri}")
    with tqdm(total=len(manifest), unit="img", desc="download", disable=None) as bar:

        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)
            progress_artifact(done, total)

        report, downloaded = download_images(
            manifest,
            settings.source_uri,
            local_dir,
            storage_for(settings, source=True),
            concurrency=concurrency,
            max_missing_share=max_missing_share,
            progress=progress,
            max_object_bytes=max_object_bytes,
        )
    logger.info(
        "Downloaded %d (%.1f MB in %.1f s), %d already present, %d missing, %d unreadable, %d corrupt",
        report.downloaded,
        report.bytes_downloaded / 1e6,
        report.seconds,
        report.already_present,
        len(report.missing),
        len(report.unreadable),
        len(report.corrupt),
    )
    problems = [{"id": image_id, "problem": "missing from the source"} for image_id in report.missing]
    problems += [{"id": image_id, "problem": why} for image_id, why in {**report.unreadable, **report.corrupt}.items()]
    if problems:
        create_table_artifact(
            key="download-problems",
            table=problems[:1000],
            description=f"{len(problems)} images could not be used (first 1000 shown)",
        )
    return report, downloaded
