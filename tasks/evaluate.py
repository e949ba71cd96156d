"""Task: score a trained model on the test channel, with confusion-matrix artifacts."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from bincount.config import Settings
from bincount.storage import storage_for
from bincount.training.evaluation import Evaluation, evaluate_model
from bincount.training.plots import confusion_matrix_plot
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
)
def evaluate_model_task(settings: Settings, model_uri: str, test_channel_uri: str) -> Evaluation:
    """Accuracy, RMSE, per-class and within-one accuracy, and the confusion matrix on the test channel."""
    logger = get_run_logger()
    logger.info("Evaluating %s on %s", model_uri, test_channel_uri)
    evaluation = evaluate_model(storage_for(settings), model_uri, test_channel_uri)
    logger.info(
        "Test accuracy %.4f, RMSE %.4f, within one %.4f on %d images",
        evaluation.accuracy, evaluation.rmse, evaluation.within_one_accuracy, evaluation.images,
    )
    create_table_artifact(
        key="confusion-matrix",
        table=[
            {"true count": str(true), **{f"predicted {c}": n for c, n in zip(evaluation.classes, row)},
             "accuracy": round(evaluation.per_class_accuracy[str(true)], 4)}
            for true, row in zip(evaluation.classes, evaluation.confusion)
        ],
        description=(
            f"Test accuracy {evaluation.accuracy:.4f}, RMSE {evaluation.rmse:.4f}, "
            f"within-one {evaluation.within_one_accuracy:.4f} ({evaluation.images} images)"
        ),
    )
    publish_plot(
        "confusion-matrix-plot",
        confusion_matrix_plot(evaluation.confusion, evaluation.classes, f"accuracy {evaluation.accuracy:.3f}"),
        "Confusion matrix (test)",
        f"RMSE {evaluation.rmse:.3f}, within-one accuracy {evaluation.within_one_accuracy:.3f}",
    )
    return evaluation
