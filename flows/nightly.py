"""Flow: the nightly retrain, which keeps a good model serving.

    prepare-data (refreshed) ──► retrain with the best known hyperparameters ──► evaluate challenger ─┐
                                 (tune first when none are known, or retune=True)                    ├─► decide ──► deploy if promoted
                                           evaluate the serving model on the same test split ────────┘     │
                                                                                                           └─► record + event

The challenger is promoted when nothing serves yet, or when its test accuracy beats the serving
model's on the same split by ``margin``. Every decision is appended to the registry, shown as an
artifact and emitted as an event (``bincount.model.promoted`` or ``bincount.model.kept``) that
automations can act on.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from bincount.config import Location
from bincount.registry import Decision, Registry, decide
from bincount.contracts.serving import EndpointNotFoundError
from bincount.factory import get_serving_backend
from flows.data import DataOptions, prepare_data
from flows.train import TrainOptions, retrain_model, train_model
from tasks.deploy import deploy_model
from tasks.evaluate import evaluate_and_publish


def publish_decision(decision: Decision) -> None:
    verdict = "promoted" if decision.promoted else "kept the serving model"
    serving = "-" if decision.serving_score is None else f"{decision.serving_score:.4f}"
    create_markdown_artifact(
        key=f"nightly-decision-{decision.endpoint_name.lower()}",
        markdown=(
            f"### Nightly retrain of `{decision.endpoint_name}`: {verdict}\n\n"
            f"| | {decision.metric} | model |\n|---|---|---|\n"
            f"| challenger | {decision.challenger_score:.4f} | `{decision.challenger_model_uri}` |\n"
            f"| serving | {serving} | `{decision.serving_model_uri or '-'}` |\n\n"
            f"Margin {decision.margin:.4f}. {decision.reason}."
        ),
        description=f"Nightly decision for {decision.endpoint_name}: {verdict}",
    )
    emit_event(
        event="bincount.model.promoted" if decision.promoted else "bincount.model.kept",
        resource={"prefect.resource.id": f"bincount.endpoint.{decision.endpoint_name}"},
        payload=decision.to_dict(),
    )


@flow(name="nightly-retrain")
def nightly_retrain(
    data: DataOptions = DataOptions(),
    training: TrainOptions = TrainOptions(),
    endpoint_name: str = "bincount",
    margin: float = 0.01,
    retune: bool = False,
    location: Location = Location(),
) -> dict[str, Any]:
    """Refresh the data, retrain, and deploy the new model only if it beats the serving one.

    Args:
        data: what to download and how to split it (the split is seeded: the same images stay on the test side).
        training: model and tools; its hyperparameters are overridden by the best known ones.
        endpoint_name: the endpoint whose model the challenger must beat.
        margin: how much higher the challenger's test accuracy must be to replace the serving model.
        retune: search hyperparameters again instead of reusing the best known ones.
        location: the profile, source bucket, artifact root, S3 endpoint and region (default: the BINCOUNT_* variables).
    """
    logger = get_run_logger()
    settings = location.settings()
    registry = Registry(settings, endpoint_name)

    prepared = prepare_data(data, Location.of(settings), refresh=True)
    known = None if retune else registry.best_hyperparameters()
    if known is None:
        logger.info("No known best hyperparameters for %r (or retune=True): tuning first", endpoint_name)
        challenger = train_model(prepared.channels, training, settings)
    else:
        logger.info("Retraining with the best known hyperparameters %s", known)
        challenger = retrain_model(prepared.channels, known, training, settings)

    try:
        serving_model_uri: str | None = get_serving_backend(settings).describe(endpoint_name).model_uri
    except EndpointNotFoundError:
        serving_model_uri = None
    serving = (
        evaluate_and_publish(settings, serving_model_uri, prepared.channels["test"], role="serving").to_dict()
        if serving_model_uri
        else None
    )
    decision = decide(endpoint_name, challenger.evaluation.to_dict(), challenger.model_uri, serving, serving_model_uri, margin)
    logger.info("%s: %s", "Promoting" if decision.promoted else "Keeping the serving model", decision.reason)
    if decision.promoted:
        registry.save_best_hyperparameters(challenger.hyperparameters, challenger.job_name, challenger.evaluation.to_dict())
        deploy_model(settings, endpoint_name, challenger.model_uri)
    registry.record(decision)
    publish_decision(decision)
    return decision.to_dict()
