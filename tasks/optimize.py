"""Task: quantize a trained model for CPU serving and check its parity; the outcome is published on every run."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from bincount.config import Settings
from bincount.optimize import Optimization, optimize_model
from bincount.storage import storage_for
from tasks.artifacts import markdown_table
from tasks.caching import OPTIMIZATION_CACHE
from tasks.logs import quiet_nncf
from tasks.retry import is_transient

OPTIMIZATION_KEY = "model-optimization"


@task(
    name="optimize-model",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=is_transient,
    cache_policy=OPTIMIZATION_CACHE,  # the same model and channels give the same optimized archive
    persist_result=True,
)
def optimize_model_task(
    settings: Settings,
    model_uri: str,
    train_channel_uri: str,
    valid_channel_uri: str,
    test_channel_uri: str,
    output_uri: str,
) -> Optimization:
    """OpenVINO int8 of ``model_uri`` written to ``output_uri`` if it passes parity; else ``model_uri`` stays."""
    logger = get_run_logger()
    logger.info(
        "Optimizing %s: int8, calibrated on %s, accuracy-controlled on %s, parity on %s",
        model_uri,
        train_channel_uri,
        valid_channel_uri,
        test_channel_uri,
    )
    quiet_nncf()
    storage = storage_for(settings)
    result = optimize_model(storage, model_uri, train_channel_uri, valid_channel_uri, test_channel_uri, output_uri)
    if result.optimized:
        logger.info("Serving the optimized model %s: %s", result.model_uri, result.reason)
    else:
        logger.warning("Serving the eager model %s: %s", result.model_uri, result.reason)
    return result


def optimize_and_publish(settings: Settings, model_uri: str, channels: dict[str, str], job_name: str) -> str:
    """Optimize the model (cached) and publish what happened; returns the model URI to register and deploy.

    The optimized archive is a new one (``optimized-models/<job>/model.tar.gz``): the trained
    archive is never rewritten. Publishing sits outside the cached task so that a run served from
    cache still shows the outcome.
    """
    output_uri = settings.artifact_uri("optimized-models", job_name, "model.tar.gz")
    arguments = (settings, model_uri, channels["train"], channels["valid"], channels["test"], output_uri)
    state = optimize_model_task(*arguments, return_state=True)
    result = state.result()
    if state.name == "Cached" and (
        result.export_failed or (result.optimized and not storage_for(settings).exists(result.model_uri))
    ):
        # An export failure may have been passing (memory, a tool installed or fixed since): a later run
        # tries again instead of serving it from cache; a parity failure is the model's, and stays cached.
        result = optimize_model_task.with_options(refresh_cache=True)(*arguments)
    rows = [
        ("serves", "optimized (OpenVINO int8)" if result.optimized else "eager (PyTorch)"),
        ("why", result.reason),
        ("model", result.model_uri),
        ("test images", result.images),
        ("eager accuracy", result.eager_accuracy),
        ("int8 accuracy", result.optimized_accuracy),
        (
            "int8 minus eager (95% paired bootstrap)",
            result.accuracy_change.points() if result.accuracy_change else None,
        ),
        ("exact McNemar p (int8 worse, one-sided)", result.p_value),
        ("top-1 agreement", result.top1_agreement),
        ("disagreements (images counted differently)", result.disagreements),
        ("calibration images", result.calibration_images),
        ("validation images (accuracy control)", result.validation_images),
        ("layers int8 / fp32", f"{result.int8_layers} / {result.fp32_layers}"),
        ("seconds", result.seconds),
    ]
    create_markdown_artifact(
        key=OPTIMIZATION_KEY,
        markdown=f"### Model optimization\n\n{markdown_table(['', ''], rows)}",
        description=f"{'optimized' if result.optimized else 'eager'}: {result.reason}",
    )
    return result.model_uri
