"""Task: the model card of a registered version (evidence for its reviewer), stored beside it in the registry and
shown as an artifact on every run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from bincount.config import Settings
from bincount.contracts.registry import ModelVersion
from bincount.model_card import build_model_card, write_model_card
from bincount.models import fetch_model
from bincount.registry import StorageModelRegistry
from bincount.storage import storage_for
from tasks.retry import is_transient


def model_card_artifact_key(group: str) -> str:
    return f"model-card-{group.lower()}"


@task(
    name="write-model-card", retries=2, retry_delay_seconds=10, retry_condition_fn=is_transient, cache_policy=NO_CACHE
)
def model_card_task(
    settings: Settings, version: ModelVersion, champion: ModelVersion | None, test_channel_uri: str, margin: float
) -> str:
    """Score ``version`` (and ``champion``, the version it would replace) on the test channel as each serves, write
    the card beside the version in the registry and show it; return the card page's URI."""
    logger = get_run_logger()
    against = "" if champion is None else f" against {champion.ref}"
    logger.info("Writing the model card of %s%s on %s", version.ref, against, test_channel_uri)
    storage = storage_for(settings)
    with tempfile.TemporaryDirectory(prefix="bincount-card-") as scratch:
        folder = Path(scratch)
        challenger_dir, _ = fetch_model(storage, version.model_uri, folder / "challenger")
        champion_dir = None
        if champion is not None and champion.version != version.version:
            champion_dir, _ = fetch_model(storage, champion.model_uri, folder / "champion")
        card = build_model_card(
            challenger_dir,
            storage.local_folder(test_channel_uri, folder / "test"),
            version,
            champion_dir,
            champion_name=str(champion.ref) if champion_dir is not None and champion else "champion",
            storage=storage,
            margin=margin,
        )
    card_uri = write_model_card(
        storage, StorageModelRegistry.from_settings(settings).card_folder(version.group, version.version), card
    )
    create_markdown_artifact(
        key=model_card_artifact_key(version.group),
        markdown=card.markdown,
        description=f"Model card of {version.ref}{against}",
    )
    logger.info("Model card of %s: %s", version.ref, card_uri)
    return card_uri
