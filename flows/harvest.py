"""Flows: production photos flow back into training.

    harvest-feedback:      resolve the base (the serving version's dataset and manifest) ─► read the capture since
                           the harvest's cursor: labelled new photos into the feedback source, the most uncertain
                           unlabelled ones into the labelling queue ─► record a manifest version ─► move the cursor
                           ─► artifact ``harvest-feedback-<dataset>`` ─► event ``bincount.feedback.harvested``
    export-label-queue:    the open queue as Label Studio tasks (its JSON import format)
    import-label-answers:  Label Studio's JSON export ─► answered photos into the feedback source ─► manifest version
    label-feedback:        a paused run whose form asks a count for each queued photo (shown inline) ─► the same

The nightly retrains on the dataset's latest manifest version (``bincount.feedback.latest_version``) from the
feedback source; docs/FEEDBACK.md has the layout, the safety rules and the wiring.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field, create_model

from bincount.capture import capture_prefix
from bincount.config import Location, to_uri
from bincount.feedback import (
    MAX_PHOTO_BYTES,
    Answer,
    FeedbackBase,
    FeedbackVersion,
    Harvest,
    QueueItem,
    data_uri,
    open_queue,
    queue_photo,
    read_cursor,
    thumbnail,
)
from bincount.manifest import CLASSES
from bincount.storage import storage_for
from tasks.feedback import (
    announce_harvest_task,
    answer_queue_task,
    export_label_studio_task,
    harvest_capture_task,
    import_label_studio_task,
    publish_feedback_task,
    record_version_task,
    resolve_base_task,
    save_cursor_task,
)
from tasks.summary import run_summary

FORM_THUMBNAIL_PX = 160
FORM_POLL_S = 2
SKIP = 0
"""The label form's answer for "skip this photo" (not a count: the classes start at 1)."""


def version_figures(version: FeedbackVersion) -> dict[str, str | int]:
    """The run summary's key figures (a run that recorded no version has none)."""
    return {"manifest version": version.manifest_uri, "images": version.images, "added": len(version.added)}


SUMMARY = run_summary(version_figures)
EXPORT_SUMMARY = run_summary(lambda tasks: {"Label Studio tasks": tasks})


@flow(name="harvest-feedback", on_completion=[SUMMARY], on_failure=[SUMMARY])
def harvest_feedback(
    endpoint_name: str,
    dataset: str | None = None,
    labels_uri: str | None = None,
    base_manifest_uri: str | None = None,
    budget: int = 20,
    look_back_hours: float = 72.0,
    max_photo_bytes: int = MAX_PHOTO_BYTES,
    then_retrain: bool = False,
    location: Location = Location(),
) -> FeedbackVersion | None:
    """Add the endpoint's labelled captured photos to its dataset, and queue the unlabelled ones that teach most.

    Args:
        endpoint_name: whose capture to read.
        dataset: the dataset the photos join (default: the one the served version was trained on).
        labels_uri: a bucket laid out like ABID whose ``metadata/<id>.json`` labels requests sent with
            ``InferenceId=<id>`` (default: the source bucket of the location, BINCOUNT_SOURCE_URI).
        base_manifest_uri: the manifest the first version starts from (default: the served version's).
        budget: at most this many unlabelled photos queued for a person per run (0: none).
        look_back_hours: also read again the capture this long before the cursor, for labels that came late.
        max_photo_bytes: a larger captured photo is refused (and listed).
        then_retrain: say so in the ``bincount.feedback.harvested`` event, so the drift chain's automation runs
            the nightly next (the drift automation starts the harvest with it).
        location: artifact root, source bucket, S3 endpoint (default: the BINCOUNT_* variables).
    """
    settings = location.settings()
    base = resolve_base_task(settings, endpoint_name, dataset, to_uri(base_manifest_uri) if base_manifest_uri else None)
    plan = Harvest(
        endpoint=endpoint_name,
        dataset=base.dataset,
        artifact_root=settings.artifact_root,
        capture_prefix=capture_prefix(settings.artifact_root, endpoint_name),
        labels_uri=to_uri(labels_uri) if labels_uri else settings.source_uri,
        after=read_cursor(storage_for(settings), settings.artifact_root, base.dataset, endpoint_name),
        look_back_hours=look_back_hours,
        budget=budget,
        max_photo_bytes=max_photo_bytes,
    )
    result = harvest_capture_task(settings, plan)
    version = record_version_task(settings, base, result.added)
    save_cursor_task(settings, base.dataset, endpoint_name, result.cursor)
    publish_feedback_task(base.dataset, version, result.refused, result)
    announce_harvest_task(endpoint_name, base.dataset, version, then_retrain)
    return version


@flow(name="export-label-queue", on_completion=[EXPORT_SUMMARY], on_failure=[EXPORT_SUMMARY])
def export_label_queue(dataset: str, tasks_uri: str, location: Location = Location()) -> int:
    """Write the dataset's open labelling queue as Label Studio tasks (import them into a project whose
    labelling interface is ``bincount.feedback.label_studio_config()``).

    Args:
        dataset: whose queue.
        tasks_uri: where the tasks JSON goes (a path, file:// or s3:// URI).
        location: artifact root, S3 endpoint (default: the BINCOUNT_* variables).
    """
    return export_label_studio_task(location.settings(), dataset, to_uri(tasks_uri))


@flow(name="import-label-answers", on_completion=[SUMMARY], on_failure=[SUMMARY])
def import_label_answers(
    endpoint_name: str,
    export_uri: str,
    dataset: str | None = None,
    base_manifest_uri: str | None = None,
    location: Location = Location(),
) -> FeedbackVersion | None:
    """Add the photos counted in Label Studio (its JSON export) to the dataset, as a new manifest version.

    Args:
        endpoint_name: the endpoint whose served version names the dataset and base manifest.
        export_uri: Label Studio's JSON export of the project the queue was exported to.
        dataset: the dataset (default: the one the served version was trained on).
        base_manifest_uri: the manifest the first version starts from (default: the served version's).
        location: artifact root, source bucket, S3 endpoint (default: the BINCOUNT_* variables).
    """
    settings = location.settings()
    base = resolve_base_task(settings, endpoint_name, dataset, to_uri(base_manifest_uri) if base_manifest_uri else None)
    added, refused = import_label_studio_task(settings, base.dataset, to_uri(export_uri))
    version = record_version_task(settings, base, added)
    publish_feedback_task(base.dataset, version, refused)
    return version


def count_form(items: list[QueueItem], photos: list[bytes], classes: tuple[int, ...] = CLASSES) -> type[RunInput]:
    """A form with one count field per queued photo (a number box; 0 skips the photo: no count is 0), the photos
    inline in its description. (An optional ``int | None`` field would show as a type switch set to None, with no
    box until a person switches it to int.)"""
    fields = {
        f"photo_{number}": (
            int,
            Field(
                default=SKIP,
                ge=SKIP,
                le=max(classes),
                description=f"Items in photo {number} ({item.image_id}; the model said {item.predicted}); {SKIP}: skip",
            ),
        )
        for number, item in enumerate(items, start=1)
    }
    form = create_model("CountPhotos", __base__=RunInput, **fields)
    lines = [f"Count the items in each photo ({min(classes)}-{max(classes)}); leave {SKIP} to skip a photo.\n"]
    lines += [f"**photo {n}** ![photo {n}]({data_uri(photo)})\n" for n, photo in enumerate(photos, start=1)]
    return form.with_initial_data(description="\n".join(lines))


@flow(name="label-feedback", on_completion=[SUMMARY], on_failure=[SUMMARY])
def label_feedback(
    endpoint_name: str,
    dataset: str | None = None,
    base_manifest_uri: str | None = None,
    photos: int = 10,
    timeout_s: int = 24 * 3600,
    location: Location = Location(),
) -> FeedbackVersion | None:
    """Pause with a form that asks a count for each of the most uncertain queued photos; add the answers.

    Args:
        endpoint_name: the endpoint whose served version names the dataset and base manifest.
        dataset: whose queue (default: the one the served version was trained on).
        base_manifest_uri: the manifest the first version starts from (default: the served version's).
        photos: at most this many photos in the form.
        timeout_s: how long the run waits for a person (then it fails; the photos stay queued).
        location: artifact root, source bucket, S3 endpoint (default: the BINCOUNT_* variables).
    """
    logger = get_run_logger()
    settings = location.settings()
    base: FeedbackBase = resolve_base_task(
        settings, endpoint_name, dataset, to_uri(base_manifest_uri) if base_manifest_uri else None
    )
    storage = storage_for(settings)
    items = open_queue(storage, settings.artifact_root, base.dataset)[:photos]
    if not items:
        logger.info("No photo waits in dataset %r's labelling queue", base.dataset)
        return None
    thumbnails = [
        thumbnail(queue_photo(storage, settings.artifact_root, base.dataset, i.image_id), FORM_THUMBNAIL_PX)
        for i in items
    ]
    logger.info("%d photos wait for a count: resume this run in the Prefect UI to answer", len(items))
    answer = pause_flow_run(wait_for_input=count_form(items, thumbnails), timeout=timeout_s, poll_interval=FORM_POLL_S)
    counts = [getattr(answer, f"photo_{n}") for n in range(1, len(items) + 1)]
    answers = [Answer(i.image_id, c, "prefect-ui") for i, c in zip(items, counts, strict=True) if c != SKIP]
    added, refused = answer_queue_task(settings, base.dataset, answers)
    version = record_version_task(settings, base, added)
    publish_feedback_task(base.dataset, version, refused)
    return version
