"""Flow: the nightly retrain, which keeps a good model serving. Runs with no parameters.

    production version's lineage ─► the dataset's latest manifest ─► prepare-data (refreshed)
    (data, recipe, hyperparameters)   (harvested feedback included)        │
                                              unchanged data and code? ─► record "unchanged" (nothing retrained)
                                                                        │ no
                      retrain the recipe (never from cache; with retune=True tune first, never from cache either)
                      ─► optimize (int8 if it passes parity, else eager) and score it as it serves
                      ─► a registered model again (same sha256)? ─► record "nothing-new" (nothing registered)
                      ─► register challenger
                      ─► under the endpoint's lock: re-read what serves, score it on the same test images ─► decide
                                      │ promoted                                         │ kept / held
                      approve (at once; a person first, without the lock) ─► deploy ─► production    archived
                                      └─► record (also when the deploy fails) + event + artifact ─► best hyperparameters

What to retrain comes from the model group's production version: its data source, manifest,
dataset, training options and full train.py recipe; parameters given explicitly still win. Where
labelled traffic was harvested into the dataset (``bincount.feedback``), its latest manifest version
and feedback source take the place of the production version's. Splits are stable (an image keeps its
side for the life of a dataset), so the test side holds no image either model trained on, and both are
scored on the same images, each as it serves. The challenger is promoted when a paired test on those
images finds it better than what serves at decision time (``bincount.registry.decide``: exact McNemar
and paired bootstrap intervals, ``margin`` a minimum gain on top; "cannot tell" keeps the serving model)
and it matches no version a rollback holds; every decision is kept in the registry with its outcome and
its statistics, shown as an artifact and emitted as an event (``bincount.model.promoted`` / ``kept``).
Only a version that reached production updates the best hyperparameters.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel

from bincount.code import code_hash
from bincount.config import Location, Settings
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.registry import PROMOTION_CONFIDENCE, PROMOTION_METRIC, Decision, DecisionOutcome, ModelVersion
from bincount.contracts.serving import RolloutStrategy, ScalingConfig
from bincount.contracts.training import JobCost
from bincount.factory import get_model_registry
from bincount.feedback import latest_version
from bincount.monitoring import last_report
from bincount.registry import dataset_ref, now_iso
from bincount.storage import storage_for
from flows.data import DataOptions, prepare_data
from flows.pipeline import recipe
from flows.promotion import promote_challenger, publish_decision
from flows.train import TrainedModel, TrainOptions, optimize_for_serving, retrain_model, train_model
from tasks.model_card import model_card_task
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


class LiveAccuracy(BaseModel):
    """The serving model's accuracy on labelled traffic: the monitor's last report of the endpoint."""

    accuracy: float
    labelled: int
    model_version: str | None
    window_end: str | None

    def summary(self) -> str:
        until = f" up to {self.window_end}" if self.window_end else ""
        return f"{self.accuracy:.3g} on {self.labelled} labelled requests to {self.model_version or '-'}{until}"


def live_accuracy(settings: Settings, endpoint_name: str) -> LiveAccuracy | None:
    """The endpoint's live accuracy from the monitor's last report; None where it has none (never monitored, or no
    request with a label)."""
    report = last_report(storage_for(settings), settings.artifact_root, endpoint_name)
    if report is None or report.get("accuracy") is None:
        return None
    return LiveAccuracy(
        accuracy=report["accuracy"],
        labelled=report["labelled"],
        model_version=report.get("model_version"),
        window_end=report.get("window_end"),
    )


class NightlyResult(BaseModel):
    """A nightly run: its decision, the serving model's live accuracy beside it, and what the retrain cost."""

    decision: Decision
    live: LiveAccuracy | None = None
    training_cost: JobCost | None = None


def nightly_figures(result: NightlyResult) -> dict[str, str | float | None]:
    """The run summary's key figures: the offline scores and their paired test, live accuracy and cost."""
    decision = result.decision

    def ref(version: int | None) -> str:
        return "-" if version is None else f"{decision.endpoint_name}:{version}"

    retrained = decision.outcome != "unchanged"
    figures: dict[str, str | float | None] = {
        "decision": decision.outcome or ("promoted" if decision.promoted else "kept the serving model"),
        "reason": decision.reason,
        "challenger": (
            f"{ref(decision.challenger_version)}, test {decision.metric} {decision.challenger_score:.3g}"
            if retrained
            else "nothing retrained"
        ),
        f"serving ({ref(decision.serving_version)}) test {decision.metric}": decision.serving_score,
    }
    comparison = decision.comparison
    if comparison is not None:
        test = comparison.mcnemar
        figures["paired test"] = (
            f"{comparison.verdict}: exact McNemar p={test.p_value:.3g} on {comparison.images} images; discordant: "
            f"{test.only_b} only the challenger right, {test.only_a} only the serving model right"
        )
        figures[f"accuracy gain ({100 * comparison.confidence:.0f}% interval)"] = (
            comparison.differences.accuracy.points()
        )
    figures["serving live accuracy"] = (
        result.live.summary() if result.live else "none: no labelled traffic in the monitor's last report"
    )
    figures["training cost"] = (
        "nothing trained"
        if not retrained
        else result.training_cost.summary()
        if result.training_cost
        else "not reported by the backend"
    )
    figures["endpoint"] = decision.endpoint_name
    return figures


SUMMARY = run_summary(nightly_figures)


def training_data(settings: Settings, data: DataOptions, given: bool) -> tuple[DataOptions, Settings]:
    """What the nightly trains on: ``data`` as ``given`` by the caller; else the production version's, on the
    dataset's latest manifest version and its feedback source where labelled traffic was harvested into it."""
    logger = get_run_logger()
    latest = None if given else latest_version(storage_for(settings), settings.artifact_root, data.dataset)
    if latest is not None:
        data = data.model_copy(update={"manifest_uri": latest.manifest_uri})
        settings = settings.model_copy(update={"source_uri": latest.source_uri})
        logger.info(
            "Dataset %r: training on its manifest version %d (%d images, %d added from labelled traffic)",
            data.dataset,
            latest.version,
            latest.images,
            len(latest.added),
        )
    logger.info(
        "Preparing dataset %r from the manifest %s (source %s)",
        data.dataset,
        data.manifest_uri or "in the source",
        settings.source_uri,
    )
    return data, settings


@flow(name="nightly-retrain", on_completion=[SUMMARY], on_failure=[SUMMARY])
def nightly_retrain(
    endpoint_name: str = "bincount",
    data: DataOptions | None = None,
    training: TrainOptions | None = None,
    margin: float = 0.01,
    confidence: float = PROMOTION_CONFIDENCE,
    retune: bool = False,
    require_approval: bool = False,
    approval_timeout_s: int = 24 * 3600,
    location: Location = Location(),
    deploy_strategy: RolloutStrategy | None = None,
    scaling: ScalingConfig | None = None,
    optimize: bool = True,
) -> NightlyResult:
    """Refresh the data, retrain what is in production, and deploy the new model only if a paired test on the
    same test images finds it better than what serves.

    Args:
        endpoint_name: the endpoint (and model group) whose production version is retrained and must be beaten.
        data: what to download and how to split it (default: what the production version was made from, on the
            dataset's latest manifest version where labelled traffic was harvested into it).
        training: model and tools (default: the production version's training options).
        margin: the least gain in test accuracy that promotes, on top of the paired test finding the challenger
            better (0.01: one point).
        confidence: how sure the paired test must be that the challenger is better (0.95: a 5% chance of promoting
            a model that is not better); below it the decision is "cannot tell" and the serving model stays.
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
    data, settings = training_data(settings, data or DataOptions(**made_with.get("data", {})), given=data is not None)
    training = training or TrainOptions(**made_with.get("training", {}))
    live = live_accuracy(settings, endpoint_name)

    prepared = prepare_data(data, Location.of(settings), refresh=True)
    dataset = dataset_ref(storage_for(settings), prepared.split_uri)
    unchanged = dataset.split_sha256 == champion.spec.dataset.split_sha256 and code_hash() == champion.spec.code_hash
    if unchanged and not retune:
        reason = "no new data and no new code: nothing retrained"
        return NightlyResult(decision=keep(settings, champion, champion, margin, "unchanged", reason), live=live)

    logger.info(
        "Retraining %s (test accuracy %.4f)%s",
        champion.ref,
        champion.spec.metrics.accuracy,
        " with a new hyperparameter search" if retune else " with its recipe",
    )
    if retune:  # tuned and trained again, never from cache: a cached job would be the champion itself
        challenger = train_model(prepared.channels, training, settings, refresh=True)
    else:
        challenger = retrain_model(prepared.channels, champion.spec.hyperparameters, training, settings, refresh=True)
    if optimize:
        challenger = optimize_for_serving(settings, challenger, prepared.channels)
    decision = judge_challenger(
        settings,
        champion,
        challenger,
        prepared.split_uri,
        prepared.channels["test"],
        recipe(data, training, settings),
        margin,
        confidence,
        require_approval,
        approval_timeout_s,
        deploy_strategy,
        scaling,
    )
    return NightlyResult(decision=decision, live=live, training_cost=challenger.cost)


def judge_challenger(
    settings: Settings,
    champion: ModelVersion,
    challenger: TrainedModel,
    split_uri: str,
    test_channel_uri: str,
    made_with: dict[str, Any],
    margin: float,
    confidence: float = PROMOTION_CONFIDENCE,
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
    card_uri = model_card_task(settings, candidate, champion, test_channel_uri, margin)
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
        card_uri=card_uri,
        confidence=confidence,
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
