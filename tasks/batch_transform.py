"""Tasks: find the model to score with, and run a batch transform over a prefix of images."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from bincount.config import Settings
from bincount.contracts.serving import BatchTransformSummary
from bincount.factory import get_serving_backend
from tasks.artifacts import ProgressArtifact
from tasks.retry import is_transient

SUMMARY_KEY = "batch-transform-summary"
ERRORS_KEY = "batch-transform-errors"
PROGRESS_KEY = "batch-transform-progress"


def scoring_sentence(summary: BatchTransformSummary) -> str:
    """What a batch transform did, in words: "all 57 already scored: nothing to do" rather than "0 scored, 0
    failed" when an earlier run had done everything."""
    if summary.images == 0:
        return f"no images under {summary.input_uri}: nothing to score"
    if summary.skipped == summary.images:
        return f"all {summary.images} already scored: nothing to do"
    parts = [f"{summary.scored} of {summary.images} scored"]
    if summary.skipped:
        parts.append(f"{summary.skipped} already done")
    if summary.failed:
        parts.append(f"{summary.failed} unreadable")
    return ", ".join(parts)


@task(name="resolve-model", cache_policy=NO_CACHE)
def resolve_model_task(settings: Settings, model_uri: str | None, endpoint_name: str | None) -> str:
    """``model_uri`` if given, else the model the endpoint ``endpoint_name`` serves now."""
    if model_uri:
        return model_uri
    if not endpoint_name:
        raise ValueError("give a model_uri, or the endpoint_name whose model should score the images")
    record = get_serving_backend(settings).describe(endpoint_name)
    get_run_logger().info(
        "Using the model of endpoint %r: version %s at %s", endpoint_name, record.version, record.model_uri
    )
    return record.model_uri


@task(
    name="batch-transform",
    cache_policy=NO_CACHE,  # resumable instead: a rerun skips every image that already has its .out
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=is_transient,
)
def batch_transform_task(
    settings: Settings,
    model_uri: str,
    input_uri: str,
    output_uri: str,
    batch_size: int = 16,
    labels_uri: str | None = None,
    rescore: bool = False,
) -> BatchTransformSummary:
    """Score every image under ``input_uri`` into ``output_uri``; returns what it did."""
    logger = get_run_logger()
    logger.info("Batch transform of %s into %s with %s (batch size %d)", input_uri, output_uri, model_uri, batch_size)
    bar = ProgressArtifact(PROGRESS_KEY, f"Batch transform of {input_uri}")
    logged = {"at": 0}

    def progress(done: int, total: int) -> None:
        bar(done, total)
        if done == total or done - logged["at"] >= max(1, total // 10):
            logged["at"] = done
            logger.info("%d/%d images done", done, total)

    summary = get_serving_backend(settings, run_key=str(flow_run.id)).batch_transform(
        model_uri,
        input_uri,
        output_uri,
        batch_size=batch_size,
        labels_uri=labels_uri,
        progress=progress,
        rescore=rescore,
    )
    for error in summary.errors:
        logger.warning("Unreadable, not scored: %s: %s", error["key"], error["error"])
    outcome = scoring_sentence(summary)
    speed = f" ({summary.images_per_s:.1f} images/s)" if summary.scored else ""
    logger.info("Batch transform: %s%s; results at %s", outcome, speed, summary.results_uri)
    create_markdown_artifact(
        key=SUMMARY_KEY,
        markdown=(
            f"### Batch transform: {outcome}\n\n| | |\n|---|---|\n"
            f"| input | `{summary.input_uri}` |\n| output | `{summary.output_uri}` |\n"
            f"| model | `{model_uri}` (version `{summary.model_version}`) |\n"
            f"| images | {summary.images} |\n| scored now | {summary.scored} ({summary.images_per_s} images/s) |\n"
            f"| already done | {summary.skipped} |\n| unreadable | {summary.failed} |\n"
            f"| accuracy (labelled images) | {summary.accuracy if summary.accuracy is not None else '-'} |\n"
            f"| results table | `{summary.results_uri}` |\n"
        ),
        description="Batch transform summary",
    )
    if summary.errors:
        create_table_artifact(
            key=ERRORS_KEY, table=summary.errors, description="Images the batch transform could not read"
        )
    return summary
