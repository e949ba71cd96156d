"""Task: score a model on the test channel (with its answer on each image); its confusion-matrix artifacts are
published on every run."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from bincount.config import Settings
from bincount.evaluation import Evaluation, evaluate_model
from bincount.plots import confusion_matrix_plot
from bincount.storage import storage_for
from tasks.artifacts import publish_plot
from tasks.caching import EVALUATION_CACHE
from tasks.retry import is_transient


@task(
    name="evaluate-model",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=is_transient,
    cache_policy=EVALUATION_CACHE,  # keyed on what the test channel holds, not just its URI
    persist_result=True,
    task_run_name="evaluate-{role}-model",
)
def score_model_task(settings: Settings, model_uri: str, test_channel_uri: str, role: str) -> Evaluation:
    """Accuracy, RMSE, per-class and within-one accuracy, the confusion matrix and the answer on each image (which
    a paired comparison with another model needs) on the test channel, of the model as it serves (its int8 form
    where it serves that, else the eager network)."""
    logger = get_run_logger()
    logger.info("Evaluating the %s model %s on %s", role, model_uri, test_channel_uri)
    evaluation = evaluate_model(storage_for(settings), model_uri, test_channel_uri)
    logger.info(
        "Test accuracy %.4f, RMSE %.4f, within one %.4f on %d images",
        evaluation.accuracy,
        evaluation.rmse,
        evaluation.within_one_accuracy,
        evaluation.images,
    )
    return evaluation


def evaluate_and_publish(
    settings: Settings, model_uri: str, test_channel_uri: str, role: str = "trained"
) -> Evaluation:
    """Score the model (cached) and publish its confusion matrix as a table and a plot.

    Publishing sits outside the cached task so that a run served from cache still shows the matrix.
    ``role`` names the model in the task run and in the artifact keys (``confusion-matrix`` for the
    model just trained, ``confusion-matrix-serving`` for the serving one), so scoring both in one
    run keeps each model's matrix.
    """
    evaluation = score_model_task(settings, model_uri, test_channel_uri, role)
    suffix = "" if role == "trained" else f"-{role}"
    create_table_artifact(
        key=f"confusion-matrix{suffix}",
        table=[
            {
                "true count": str(true),
                **{f"predicted {c}": n for c, n in zip(evaluation.classes, row, strict=True)},
                "accuracy": round(evaluation.per_class_accuracy[str(true)], 4),
            }
            for true, row in zip(evaluation.classes, evaluation.confusion, strict=True)
        ],
        description=(
            f"The {role} model {model_uri}: test accuracy {evaluation.accuracy:.4f}, RMSE {evaluation.rmse:.4f}, "
            f"within-one {evaluation.within_one_accuracy:.4f} ({evaluation.images} images)"
        ),
    )
    publish_plot(
        f"confusion-matrix-plot{suffix}",
        confusion_matrix_plot(evaluation.confusion, evaluation.classes, f"accuracy {evaluation.accuracy:.3f}"),
        f"Confusion matrix of the {role} model (test)",
        f"RMSE {evaluation.rmse:.3f}, within-one accuracy {evaluation.within_one_accuracy:.3f}",
    )
    return evaluation
