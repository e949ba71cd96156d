"""Tasks: harvest labelled captured photos into a dataset's feedback source, record manifest versions, and the
labelling queue (Label Studio's task JSON out, its export back). The logic is in ``bincount/feedback.py``.

Event: ``bincount.feedback.harvested`` about the dataset at the end of every harvest, new version or not (the
drift chain's automation starts the nightly on it when the harvest was asked to be followed by a retrain).
"""

from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from bincount.config import Settings
from bincount.contracts.registry import parse_reference
from bincount.endpoints import EndpointRecords
from bincount.factory import get_model_registry
from bincount.feedback import (
    AddedImage,
    Answer,
    FeedbackBase,
    FeedbackVersion,
    Harvest,
    HarvestResult,
    Refusal,
    answer_queue,
    feedback_base,
    harvest,
    label_studio_tasks,
    parse_label_studio_export,
    record_version,
    save_cursor,
)
from bincount.storage import storage_for
from tasks.artifacts import markdown_table
from tasks.retry import is_transient

HARVESTED_EVENT = "bincount.feedback.harvested"
ADDED_COLUMNS = [
    "image",
    "label",
    "InferenceId",
    "endpoint",
    "model version",
    "captured at",
    "labelled by",
    "capture file",
]


def harvest_artifact_key(dataset: str) -> str:
    return f"harvest-feedback-{dataset}"


@task(name="resolve-feedback-base", retries=2, retry_delay_seconds=10, retry_condition_fn=is_transient)
def resolve_base_task(settings: Settings, endpoint: str, dataset: str | None, manifest_uri: str | None) -> FeedbackBase:
    """The dataset, manifest and source the version ``endpoint`` serves was trained on (what is given wins)."""
    record = EndpointRecords(settings, storage_for(settings)).read(endpoint)
    recipe = {}
    if record is not None and record.model_ref:
        recipe = get_model_registry(settings).resolve(parse_reference(record.model_ref)).spec.recipe
    base = feedback_base(recipe, settings.source_uri, dataset, manifest_uri)
    get_run_logger().info(
        "Feedback for dataset %r starts from %s (photos from %s)", base.dataset, base.manifest_uri, base.source_uri
    )
    return base


@task(
    name="harvest-capture",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=is_transient,
    cache_policy=NO_CACHE,
)
def harvest_capture_task(settings: Settings, plan: Harvest) -> HarvestResult:
    """Read the capture since the harvest's cursor; store labelled new photos; queue the ones that teach most."""
    logger = get_run_logger()
    logger.info(
        "Harvesting %s since %s (labels from %s) into dataset %r",
        plan.capture_prefix,
        plan.after.isoformat() if plan.after else "the start",
        plan.labels_uri or "nowhere",
        plan.dataset,
    )
    result = harvest(storage_for(settings), storage_for(settings, source=True), plan)
    logger.info(
        "%s: %d requests read, %d photos labelled and stored, %d already in the dataset, %d refused, %d unlabelled "
        "(%d queued for a person)",
        plan.endpoint,
        result.read,
        len(result.added),
        result.duplicates,
        len(result.refused),
        result.unlabelled,
        len(result.queued),
    )
    for refusal in result.refused[:20]:
        logger.warning("Refused %s (%s): %s", refusal.photo, refusal.capture_file, refusal.reason)
    for problem in result.problems[:20]:
        logger.warning("%s: %s", plan.endpoint, problem)
    return result


@task(name="record-manifest-version", retries=2, retry_delay_seconds=10, retry_condition_fn=is_transient)
def record_version_task(settings: Settings, base: FeedbackBase, added: list[AddedImage]) -> FeedbackVersion | None:
    """A new version of the dataset's manifest: the latest's entries plus ``added`` (None: nothing new)."""
    version = record_version(
        storage_for(settings),
        storage_for(settings.model_copy(update={"source_uri": base.source_uri}), source=True),
        settings.artifact_root,
        base,
        added,
    )
    logger = get_run_logger()
    if version is None:
        logger.info("Nothing new for dataset %r: no manifest version recorded", base.dataset)
        return None
    logger.info(
        "Recorded %s: %d images (%d added, %d originals copied into the feedback source)",
        version.manifest_uri,
        version.images,
        len(version.added),
        version.mirrored,
    )
    return version


@task(name="announce-harvest", cache_policy=NO_CACHE)
def announce_harvest_task(endpoint: str, dataset: str, version: FeedbackVersion | None, then_retrain: bool) -> None:
    """``bincount.feedback.harvested`` about the dataset (labels: the endpoint, and whether a retrain should follow,
    which the drift chain's automation matches on), with the new version (if any) in the payload."""
    emit_event(
        event=HARVESTED_EVENT,
        resource={
            "prefect.resource.id": f"bincount.dataset.{dataset}",
            "prefect.resource.name": dataset,
            "bincount.endpoint": endpoint,
            "bincount.retrain": str(then_retrain).lower(),
        },
        payload={
            "version": version.version if version else None,
            "manifest_uri": version.manifest_uri if version else None,
            "added": len(version.added) if version else 0,
        },
    )


@task(name="save-harvest-cursor", retries=2, retry_delay_seconds=10, retry_condition_fn=is_transient)
def save_cursor_task(settings: Settings, dataset: str, endpoint: str, cursor: str | None) -> None:
    """Move the harvest's cursor past what it read (after its additions are recorded)."""
    if cursor is not None:
        save_cursor(storage_for(settings), settings.artifact_root, dataset, endpoint, cursor)


@task(name="publish-feedback", cache_policy=NO_CACHE)
def publish_feedback_task(
    dataset: str,
    version: FeedbackVersion | None,
    refused: list[Refusal],
    result: HarvestResult | None = None,
) -> None:
    """Every added photo (with its lineage), every refusal and the queued photos, in one markdown artifact."""
    added = version.added if version else []
    lines = [f"## Feedback for dataset `{dataset}`", ""]
    if version:
        lines.append(
            f"Manifest version {version.version}: `{version.manifest_uri}` ({version.images} images, "
            f"{len(added)} added, source `{version.source_uri}`)."
        )
    else:
        lines.append("No new manifest version: nothing new to add.")
    if result is not None:
        lines.append(
            f"\nRead {result.read} captured requests of `{result.endpoint}`; {result.duplicates} photos already in "
            f"the dataset; {result.unlabelled} without a label."
        )
    lines += [f"\n### Added ({len(added)})\n"]
    lines.append(
        markdown_table(
            ADDED_COLUMNS,
            [
                [
                    a.image_id,
                    a.label,
                    a.lineage.inference_id,
                    a.lineage.endpoint,
                    a.lineage.model_version,
                    a.lineage.captured_at,
                    a.lineage.labelled_by,
                    a.lineage.capture_file,
                ]
                for a in added
            ],
        )
    )
    lines += [
        f"\n### Refused ({len(refused)})\n",
        markdown_table(["photo", "capture file", "why"], [[r.photo, r.capture_file, r.reason] for r in refused]),
    ]
    if result is not None:
        lines += [
            f"\n### Queued for a count ({len(result.queued)})\n",
            markdown_table(
                ["queue item", "predicted", "uncertainty (count s.d.)", "disagreement", "InferenceId"],
                [
                    [q.image_id, q.predicted, q.uncertainty, q.disagreement, q.lineage.inference_id]
                    for q in result.queued
                ],
            ),
        ]
    create_markdown_artifact(
        key=harvest_artifact_key(dataset),
        markdown="\n".join(lines),
        description=f"Photos added to dataset {dataset} from production",
    )


@task(name="export-label-studio-tasks", retries=2, retry_delay_seconds=10, retry_condition_fn=is_transient)
def export_label_studio_task(settings: Settings, dataset: str, tasks_uri: str) -> int:
    """Write the open queue as Label Studio tasks (JSON) at ``tasks_uri``; returns how many."""
    storage = storage_for(settings)
    tasks = label_studio_tasks(storage, settings.artifact_root, dataset)
    storage.write_bytes(tasks_uri, json.dumps(tasks).encode())
    get_run_logger().info("Wrote %d Label Studio tasks for dataset %r to %s", len(tasks), dataset, tasks_uri)
    return len(tasks)


@task(name="import-label-answers", retries=2, retry_delay_seconds=10, retry_condition_fn=is_transient)
def import_label_studio_task(
    settings: Settings, dataset: str, export_uri: str
) -> tuple[list[AddedImage], list[Refusal]]:
    """Read Label Studio's JSON export at ``export_uri`` and add the answered photos to the feedback source."""
    storage = storage_for(settings)
    answers, refused = parse_label_studio_export(storage.read_bytes(export_uri), export_uri)
    added, not_taken = answer_queue(storage, settings.artifact_root, dataset, answers)
    get_run_logger().info(
        "%s: %d answers, %d photos added to dataset %r, %d refused",
        export_uri,
        len(answers),
        len(added),
        dataset,
        len(refused) + len(not_taken),
    )
    return added, refused + not_taken


@task(name="answer-label-queue", retries=2, retry_delay_seconds=10, retry_condition_fn=is_transient)
def answer_queue_task(
    settings: Settings, dataset: str, answers: list[Answer]
) -> tuple[list[AddedImage], list[Refusal]]:
    """Add the photos a person counted (in the Prefect UI) to the feedback source."""
    return answer_queue(storage_for(settings), settings.artifact_root, dataset, answers)
