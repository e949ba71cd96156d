"""Flow: the nightly retrain, which keeps a good model serving. Runs with no parameters.

    production version's lineage ─► the dataset's latest manifest ─► prepare-data (refreshed)
    (data, recipe, hyperparameters)   (harvested feedback included)        │
                                              unchanged data and code? ─► record "unchanged" (nothing retrained)
                                                                        │ no
                      retrain the recipe (never from cache; with retune=True tune first, never from cache either)
                      ─► optimize (int8 if it passes parity, else eager) and score it as it serves
                      ─► promote (flows/promotion.py, the pipeline's step): a registered model again? "nothing-new";
                         else register ─► model card ─► paired test against what serves ─► approve ─► deploy
                         ─► production ─► record the decision (+ event + artifact) ─► best hyperparameters

What to retrain comes from the model group's production version: its data source, manifest,
dataset, training options and full train.py recipe; parameters given explicitly still win. Where
labelled traffic was harvested into the dataset (``bincount.feedback``), its latest manifest version
and feedback source take the place of the production version's. Splits are stable (an image keeps its
side for the life of a dataset), so the test side holds no image either model trained on, and both are
scored on the same images, each as it serves. The challenger is promoted when a paired test on those
images finds it better than what serves at decision time (``bincount.registry.decide``: exact McNemar
and paired bootstrap intervals, ``margin`` a minimum gain on top; "cannot tell" keeps the serving model)
and it matches no version a rollback holds; every decision is kept in the registry with its outcome and
its statistics, shown as an artifact beside the serving model's live accuracy and emitted as an event
(``bincount.model.promoted`` / ``kept``). Only a version that reached production updates the best
hyperparameters.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel

from bincount.code import code_hash
from bincount.config import Location, Settings
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.registry import PROMOTION_CONFIDENCE, PROMOTION_MARGIN, Decision, ModelVersion
from bincount.contracts.serving import RolloutStrategy, ScalingConfig
from bincount.contracts.training import JobCost
from bincount.factory import get_model_registry
from bincount.feedback import latest_version
from bincount.registry import dataset_ref, decision_without_test
from bincount.storage import storage_for
from flows.data import DataOptions, prepare_data
from flows.promotion import (
    Challenger,
    DeployOptions,
    LiveAccuracy,
    PromotionPolicy,
    decision_figures,
    live_accuracy,
    promote_trained,
    recipe,
    record_decision,
)
from flows.train import TrainOptions, optimize_for_serving, retrain_model, train_model
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


class NightlyResult(BaseModel):
    """A nightly run: its decision, the serving model's live accuracy beside it, and what the retrain cost."""

    decision: Decision
    live: LiveAccuracy | None = None
    training_cost: JobCost | None = None


def nightly_figures(result: NightlyResult) -> dict[str, str | float | None]:
    """The run summary's key figures: the decision (offline scores and their paired test, live accuracy) and cost."""
    decision = result.decision
    figures = decision_figures(decision, result.live)
    figures["training cost"] = (
        "nothing trained"
        if decision.outcome == "unchanged"
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
    margin: float = PROMOTION_MARGIN,
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
    check_endpoint_name(endpoint_name)
    champion = production_version(location.settings(), endpoint_name)
    data, training, settings = retrain_inputs(champion, location, data, training)
    live = live_accuracy(settings, endpoint_name)
    policy = PromotionPolicy(
        "nightly",
        margin=margin,
        confidence=confidence,
        require_approval=require_approval,
        approval_timeout_s=approval_timeout_s,
    )

    prepared = prepare_data(data, Location.of(settings), refresh=True)
    dataset = dataset_ref(storage_for(settings), prepared.split_uri)
    unchanged = dataset.split_sha256 == champion.spec.dataset.split_sha256 and code_hash() == champion.spec.code_hash
    if unchanged and not retune:
        reason = "no new data and no new code: nothing retrained"
        decision = decision_without_test(champion, champion, margin, "unchanged", reason)
        return NightlyResult(decision=record_decision(settings, decision, policy.by, live), live=live)

    get_run_logger().info(
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
    promotion = promote_trained(
        settings,
        endpoint_name,
        Challenger(challenger, prepared.split_uri, prepared.channels["test"], recipe(data, training, settings)),
        policy,
        DeployOptions(strategy=deploy_strategy, scaling=scaling),
        live,
    )
    return NightlyResult(decision=promotion.decision, live=live, training_cost=challenger.cost)


def retrain_inputs(
    champion: ModelVersion, location: Location, data: DataOptions | None, training: TrainOptions | None
) -> tuple[DataOptions, TrainOptions, Settings]:
    """What to retrain and where: ``data``, ``training`` and ``location`` as given, the rest from the production
    version's recipe (:func:`training_data` for the data)."""
    made_with = champion.spec.recipe
    given = location.model_dump(exclude_none=True)
    settings = Location(**{**made_with.get("location", {}), **given}).settings()
    data, settings = training_data(settings, data or DataOptions(**made_with.get("data", {})), given=data is not None)
    return data, training or TrainOptions(**made_with.get("training", {})), settings
