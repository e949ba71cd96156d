"""Task: load the manifest (seed format) or build one from image ids."""

from __future__ import annotations

from prefect import get_run_logger, task

from bincount.config import Settings
from bincount.manifest import Manifest, build_manifest, read_manifest
from bincount.storage import storage_for
from tasks.retry import is_transient


@task(
    name="load-manifest",
    retries=3,
    retry_delay_seconds=[5, 20, 60],
    retry_jitter_factor=0.5,
    retry_condition_fn=is_transient,
)
def load_manifest(settings: Settings, manifest_uri: str | None = None, image_ids: list[str] | None = None) -> Manifest:
    """Read ``manifest_uri`` (default: ``<source>/file_list.json``), or label ``image_ids`` from their metadata."""
    logger = get_run_logger()
    storage = storage_for(settings, source=True)
    if image_ids:
        logger.info("Building a manifest from %d ids' metadata under %s", len(image_ids), settings.source_uri)
        built = build_manifest(storage, settings.source_uri, image_ids)
        for image_id, why in list(built.left_out.items())[:20]:
            logger.warning("Left out %s: %s", image_id, why)
        if built.left_out:
            logger.warning("Left out %d of %d ids", len(built.left_out), len(image_ids))
        return built.manifest
    uri = manifest_uri or f"{settings.source_uri}/file_list.json"
    logger.info("Reading manifest %s", uri)
    manifest = read_manifest(storage, uri)
    logger.info("Manifest lists %d images", len(manifest))
    return manifest
