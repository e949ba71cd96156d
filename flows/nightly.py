"""Flow: the nightly retrain, which keeps a good model serving. Runs with no parameters.

    production version's lineage ─► prepare-data (refreshed) ─► unchanged data and code? ─► record "nothing retrained"
    (data, recipe, hyperparameters)                                     │ no
                                         retrain the recipe (never from cache; tune first with retune=True)
                                         ─► optimize (int8 if it passes parity, else eager)
                                         ─► register challenger ─► evaluate champion on the same test side ─► decide
                                                                                                                │
                          promoted: approve (at once, or a person) ─► deploy ─► production          kept: archived
                                                                                   └─► record + event + artifact

What to retrain comes from the model group's production version (what the endpoint serves): its
data source, manifest, dataset, training options and full train.py recipe; parameters given
explicitly still win. Splits are stable (an image keeps its side for the life of a dataset), so the
test side holds no image either model trained on, and both are scored on the same images. The
challenger is promoted when it beats the champion by ``margin``; every decision is kept in the
registry, shown as an artifact and emitted as an event (``bincount.model.promoted`` / ``kept``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from bincount.code import code_hash
from bincount.config import Location, Settings
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.registry import Decision, ModelVersion
from bincount.contracts.serving import RolloutStrategy, ScalingConfig
from bincount.factory import get_model_registry
from bincount.registry import dataset_ref, decide, now_iso
from bincount.storage import storage_for
from flows.data import DataOptions, prepare_data
from flows.pipeline import recipe
from flows.promotion import approve_version, put_in_production
from flows.train import TrainOptions, retrain_model, train_model
from tasks.evaluate import evaluate_and_publish
from tasks.optimize import optimize_and_publish
from tasks.registry import register_model_task, set_stage_task
from tasks.summary import run_summary


class NoProductionModelError(LookupError):
    """The group has no production version to retrain: the pipeline has not deployed one yet."""


def publish_decision(decision: Decision) -> None:
    verdict = "promoted" if decision.promoted else "kept the serving model"
    serving = "-" if decision.serving_score is None else f"{decision.serving_score:.3g}"
    challenger = (
        "-" if decision.challenger_version is None else f"{decision.endpoint_name}:{decision.challenger_version}"
    )
    champion = "-" if decision.serving_version is None else f"{decision.endpoint_name}:{decision.serving_version}"
    create_markdown_artifact(
        key=f"nightly-decision-{decision.endpoint_name.lower()}",
        markdown=(
            f"### Nightly retrain of `{decision.endpoint_name}`: {verdict}\n\n"
            f"| | version | test {decision.metric} |\n|---|---|---|\n"
            f"| challenger | `{challenger}` | {decision.challenger_score:.3g} |\n"
            f"| serving | `{champion}` | {serving} |\n\n"
            f"Margin {decision.margin:.3g}. {decision.reason}."
        ),
        description=f"Nightly decision for {decision.endpoint_name}: {verdict}",
    )
    emit_event(
        event="bincount.model.promoted" if decision.promoted else "bincount.model.kept",
        resource={"prefect.resource.id": f"bincount.endpoint.{decision.endpoint_name}"},
        payload=decision.to_dict(),
    )


def production_version(settings: Settings, endpoint_name: str) -> ModelVersion:
    champion = get_model_registry(settings).production(endpoint_name)
    if champion is None:
        raise NoProductionModelError(
            f"model group {endpoint_name!r} has no production version to retrain: run the pipeline first "
            "(`prefect deployment run 'bincount-pipeline/demo'`, or `bincount demo`), or give endpoint_name of a "
            "group that has one"
        )
    return champion


def nightly_figures(result: Decision) -> dict[str, str | float | None]:
    """The run summary's key figures."""

    def ref(version: int | None) -> str | None:
        return None if version is None else f"{result.endpoint_name}:{version}"

    return {
        "decision": "promoted" if result.promoted else "kept the serving model",
        "reason": result.reason,
        f"challenger ({ref(result.challenger_version) or 'none'}) test {result.metric}": result.challenger_score,
        f"serving ({ref(result.serving_version) or '-'}) test {result.metric}": result.serving_score,
        "endpoint": result.endpoint_name,
    }


SUMMARY = run_summary(nightly_figures)


@flow(name="nightly-retrain", on_completion=[SUMMARY], on_failure=[SUMMARY])
def nightly_retrain(
    endpoint_name: str = "bincount",
    data: DataOptions | None = None,
    training: TrainOptions | None = None,
    margin: float = 0.01,
    retune: bool = False,
    require_approval: bool = False,
    approval_timeout_s: int = 24 * 3600,
    location: Location = Location(),
    deploy_strategy: RolloutStrategy | None = None,
    scaling: ScalingConfig | None = None,
    optimize: bool = True,
) -> Decision:
    """Refresh the data, retrain what is in production, and deploy the new model only if it is better.

    Args:
        endpoint_name: the endpoint (and model group) whose production version is retrained and must be beaten.
        data: what to download and how to split it (default: what the production version was made from).
        training: model and tools (default: the production version's training options).
        margin: how much higher the challenger's test accuracy must be to replace the serving model.
        retune: search hyperparameters again instead of reusing the production version's recipe.
        require_approval: wait for a person to approve a promoted challenger in the Prefect UI.
        approval_timeout_s: with require_approval, reject the challenger when nobody answers within this.
        location: profile, artifact root, source bucket, S3 endpoint and region (default: the source the
            production version came from, then the BINCOUNT_* variables; what is given here wins).
        deploy_strategy: how traffic moves to a promoted challenger (default all at once; a canary rolls back by
            itself when the challenger serves worse than the champion).
        scaling: the endpoint's replicas and autoscaling bounds for a promoted challenger (default: keep the
            endpoint's).
        optimize: register (and deploy, if promoted) the challenger's int8 OpenVINO form when it passes parity
            on the test side; the eager model otherwise (False: always eager).
    """
    logger = get_run_logger()
    check_endpoint_name(endpoint_name)
    champion = production_version(location.settings(), endpoint_name)
    made_with = champion.spec.recipe
    given = location.model_dump(exclude_none=True)
    settings = Location(**{**made_with.get("location", {}), **given}).settings()
    data = data or DataOptions(**made_with.get("data", {}))
    training = training or TrainOptions(**made_with.get("training", {}))
    logger.info(
        "Retraining %s (test accuracy %.4f) from %s", champion.ref, champion.spec.metrics.accuracy, settings.source_uri
    )

    prepared = prepare_data(data, Location.of(settings), refresh=True)
    dataset = dataset_ref(storage_for(settings), prepared.split_uri)
    unchanged = dataset.split_sha256 == champion.spec.dataset.split_sha256 and code_hash() == champion.spec.code_hash
    if unchanged and not retune:
        decision = Decision(
            endpoint_name=endpoint_name,
            promoted=False,
            reason="no new data and no new code: nothing retrained",
            metric="accuracy",
            challenger_score=champion.spec.metrics.accuracy,
            serving_score=champion.spec.metrics.accuracy,
            margin=margin,
            challenger_model_uri=champion.model_uri,
            serving_model_uri=champion.model_uri,
            decided_at=now_iso(),
            challenger_version=None,
            serving_version=champion.version,
        )
        logger.info("%s: %s", champion.ref, decision.reason)
        get_model_registry(settings).record(decision)
        publish_decision(decision)
        return decision

    if retune:
        challenger = train_model(prepared.channels, training, settings)
    else:
        challenger = retrain_model(prepared.channels, champion.spec.hyperparameters, training, settings, refresh=True)
    if optimize:
        optimized_uri = optimize_and_publish(settings, challenger.model_uri, prepared.channels, challenger.job_name)
        challenger = challenger.model_copy(update={"model_uri": optimized_uri})
    candidate = register_model_task(
        settings,
        endpoint_name,
        challenger.model_uri,
        challenger.evaluation,
        prepared.split_uri,
        challenger.hyperparameters,
        challenger.job_name,
        recipe(data, training, settings),
    )
    serving = evaluate_and_publish(settings, champion.model_uri, prepared.channels["test"], role="serving")
    decision = decide(
        endpoint_name,
        challenger.evaluation.to_dict(),
        challenger.model_uri,
        serving.to_dict(),
        champion.model_uri,
        margin,
        challenger_version=candidate.version,
        serving_version=champion.version,
    )
    logger.info("%s: %s", "Promoting" if decision.promoted else "Keeping the serving model", decision.reason)
    if decision.promoted:
        candidate = approve_version(settings, candidate, require_approval, approval_timeout_s, decision.reason)
        if candidate.approval == "Approved":
            get_model_registry(settings).save_best_hyperparameters(
                endpoint_name,
                challenger.hyperparameters,
                challenger.job_name,
                challenger.evaluation.to_dict(),
                candidate.version,
            )
            put_in_production(
                settings,
                endpoint_name,
                candidate,
                f"nightly: {decision.reason}",
                strategy=deploy_strategy,
                scaling=scaling,
            )
        else:
            decision = Decision(
                **{
                    **decision.to_dict(),
                    "promoted": False,
                    "reason": f"{decision.reason}, but rejected: {candidate.history[-1].reason}",
                }
            )
    else:
        set_stage_task(settings, candidate, "archived", "nightly", decision.reason)
    get_model_registry(settings).record(decision)
    publish_decision(decision)
    return decision
