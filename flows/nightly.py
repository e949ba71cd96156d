"""Flow: the nightly retrain, which keeps a good model serving. Runs with no parameters.

    production version's lineage ─► prepare-data (refreshed) ─► unchanged data and code? ─► record "unchanged"
    (data, recipe, hyperparameters)                                     │ no
                      retrain the recipe (never from cache; with retune=True tune first, never from cache either)
                      ─► optimize (int8 if it passes parity, else eager) and score it as it serves
                      ─► a registered model again (same sha256)? ─► record "nothing-new" (nothing registered)
                      ─► register challenger
                      ─► under the endpoint's lock: re-read what serves, score it on the same test images ─► decide
                                      │ promoted                                         │ kept / held
                      approve (at once; a person first, without the lock) ─► deploy ─► production    archived
                                      └─► record (also when the deploy fails) + event + artifact ─► best hyperparameters

What to retrain comes from the model group's production version: its data source, manifest,
dataset, training options and full train.py recipe; parameters given explicitly still win. Splits
are stable (an image keeps its side for the life of a dataset), so the test side holds no image
either model trained on, and both are scored on the same images, each as it serves. The challenger
is promoted when it beats what serves at decision time by ``margin`` and matches no version a
rollback holds; every decision is kept in the registry with its outcome, shown as an artifact and
emitted as an event (``bincount.model.promoted`` / ``kept``). Only a version that reached
production updates the best hyperparameters.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from bincount.code import code_hash
from bincount.config import Location, Settings
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.registry import PROMOTION_METRIC, Decision, DecisionOutcome, ModelVersion
from bincount.contracts.serving import RolloutStrategy, ScalingConfig
from bincount.factory import get_model_registry
from bincount.registry import dataset_ref, now_iso
from bincount.storage import storage_for
from flows.data import DataOptions, prepare_data
from flows.pipeline import recipe
from flows.promotion import promote_challenger, publish_decision
from flows.train import TrainedModel, TrainOptions, optimize_for_serving, retrain_model, train_model
from tasks.registry import find_registered_task, record_decision_task, register_model_task
from tasks.summary import run_summary


class NoProductionModelError(LookupError):
    """The group has no production version to retrain: the pipeline has not deployed one yet."""


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
        "decision": result.outcome or ("promoted" if result.promoted else "kept the serving model"),
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
        return keep(settings, champion, champion, margin, "unchanged", "no new data and no new code: nothing retrained")

    if retune:  # tuned and trained again, never from cache: a cached job would be the champion itself
        challenger = train_model(prepared.channels, training, settings, refresh=True)
    else:
        challenger = retrain_model(prepared.channels, champion.spec.hyperparameters, training, settings, refresh=True)
    if optimize:
        challenger = optimize_for_serving(settings, challenger, prepared.channels)
    return judge_challenger(
        settings,
        champion,
        challenger,
        prepared.split_uri,
        prepared.channels["test"],
        recipe(data, training, settings),
        margin,
        require_approval,
        approval_timeout_s,
        deploy_strategy,
        scaling,
    )


def judge_challenger(
    settings: Settings,
    champion: ModelVersion,
    challenger: TrainedModel,
    split_uri: str,
    test_channel_uri: str,
    made_with: dict[str, Any],
    margin: float,
    require_approval: bool = False,
    approval_timeout_s: int = 24 * 3600,
    deploy_strategy: RolloutStrategy | None = None,
    scaling: ScalingConfig | None = None,
) -> Decision:
    """What becomes of a trained challenger: nothing new when its model is a registered version's (it is neither
    registered nor archived again); else registered, then compared with what serves and promoted if better
    (:func:`~flows.promotion.promote_challenger`); the best hyperparameters follow only a version in production."""
    endpoint_name = champion.group
    same = find_registered_task(settings, endpoint_name, challenger.model_uri)
    if same is not None:
        reason = f"the challenger's model is {same.ref}'s (same sha256): nothing new, nothing registered or archived"
        return keep(settings, same, champion, margin, "nothing-new", reason)
    candidate = register_model_task(
        settings,
        endpoint_name,
        challenger.model_uri,
        challenger.evaluation,
        split_uri,
        challenger.hyperparameters,
        challenger.job_name,
        made_with,
    )
    decision = promote_challenger(
        settings,
        candidate,
        challenger.evaluation,
        test_channel_uri,
        margin,
        require_approval,
        approval_timeout_s,
        deploy_strategy,
        scaling,
    )
    registry = get_model_registry(settings)
    if registry.get(endpoint_name, candidate.version).stage == "production":  # not a shadow still waiting
        registry.save_best_hyperparameters(
            endpoint_name,
            challenger.hyperparameters,
            challenger.job_name,
            challenger.evaluation.to_dict(),
            candidate.version,
        )
    return decision


def keep(
    settings: Settings,
    challenger: ModelVersion,
    champion: ModelVersion,
    margin: float,
    outcome: DecisionOutcome,
    reason: str,
) -> Decision:
    """Record and publish a decision taken before any comparison: no model was new (``challenger`` is the
    registered version the challenger would have been); the registry's stages are left as they are."""
    decision = Decision(
        endpoint_name=champion.group,
        promoted=False,
        reason=reason,
        metric=PROMOTION_METRIC,
        challenger_score=challenger.spec.metrics.accuracy,
        serving_score=champion.spec.metrics.accuracy,
        margin=margin,
        challenger_model_uri=challenger.model_uri,
        serving_model_uri=champion.model_uri,
        decided_at=now_iso(),
        challenger_version=None if outcome == "unchanged" else challenger.version,
        serving_version=champion.version,
        outcome=outcome,
    )
    get_run_logger().info("%s: %s", champion.ref, reason)
    record_decision_task(settings, decision)
    publish_decision(decision)
    return decision
