"""Flow: score a prefix of images offline, with a given model or the one an endpoint serves.

    resolve-model -> batch-transform

Output: one ``<key>.out`` per input image under ``output_uri`` (as SageMaker's batch transform
writes them), ``results.csv`` (id, predicted count, probabilities, label where known) and
``errors.csv`` for unreadable images. Reruns skip what is done, so a failed run resumes; a rerun
with another model into the same output is refused unless ``rescore`` asks to score everything again.
"""

from __future__ import annotations

from prefect import flow

from bincount.config import Location, to_uri
from bincount.contracts.serving import BatchTransformSummary
from tasks.batch_transform import batch_transform_task, resolve_model_task, scoring_sentence
from tasks.summary import run_summary


def batch_figures(result: BatchTransformSummary) -> dict[str, str | int | float | None]:
    """The run summary's key figures."""
    return {
        "outcome": scoring_sentence(result),
        "model version": result.model_version,
        "images": result.images,
        "scored": result.scored,
        "skipped (done before)": result.skipped,
        "failed": result.failed,
        "accuracy": result.accuracy,
        "images/s": result.images_per_s,
        "results": result.results_uri,
    }


SUMMARY = run_summary(batch_figures)


@flow(name="batch-transform", on_completion=[SUMMARY], on_failure=[SUMMARY])
def batch_transform(
    input_uri: str,
    output_uri: str,
    model_uri: str | None = None,
    endpoint_name: str | None = "bincount",
    batch_size: int = 16,
    labels_uri: str | None = None,
    rescore: bool = False,
    location: Location = Location(),
) -> BatchTransformSummary:
    """Score every .jpg/.jpeg/.png under ``input_uri``.

    Args:
        input_uri: prefix (file:// or s3://) holding the images; channel folders give labels.
        output_uri: prefix for the .out files and the results table; must not overlap the input.
        model_uri: model.tar.gz or model folder to score with (default: the endpoint's model).
        endpoint_name: endpoint whose model to use when no model_uri is given.
        batch_size: images per forward pass.
        labels_uri: CSV with id and label columns (e.g. a dataset's split.csv) for the results table.
        rescore: score every image again, even where output_uri holds answers (maybe of another model).
        location: where endpoint records live and which backend scores (default: the BINCOUNT_* variables).
    """
    settings = location.settings()
    model = resolve_model_task(settings, model_uri, endpoint_name)
    return batch_transform_task(
        settings,
        model,
        to_uri(input_uri),
        to_uri(output_uri),
        batch_size=batch_size,
        labels_uri=labels_uri,
        rescore=rescore,
    )
