"""Flow: the whole pipeline, from a manifest to a serving endpoint and scored images.

    prepare-data ─► train-model ─► optimize-model ─► promote (flows/promotion.py) ──────────► batch-transform
    (download,      (tune ─►        (int8 if it      (register ─► model card ─► quality gate      (the test channel,
     split, upload,  retrain ─►      passes parity,   ─► paired test against what serves           with the model
     report)         evaluate)       else eager)      ─► approve ─► deploy ─► production ─► record) that serves)

Stages run on the backend the profile picks (``local`` here, ``aws`` for SageMaker jobs). Each
stage caches on its inputs (see each flow), so an unchanged re-run is served from cache up to the
first stage whose inputs changed; ``refresh=True`` runs everything again. The deploy is never
cached; a re-run whose model already serves deploys nothing, and says so. Every trained model is
registered with its lineage (data, code, recipe, job, this run) and scored as it serves (int8 where
it serves int8). The promotion is the nightly's: a model below ``min_accuracy`` is rejected; where a
version serves the endpoint, the new model replaces it only when a paired test on the same test
images finds it better (exact McNemar and paired bootstrap intervals; "cannot tell" keeps what
serves), and the decision is kept in the registry with its statistics and shown beside the serving
model's live accuracy. Only a model that reached production updates the best hyperparameters.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from pydantic import BaseModel, Field

from bincount.config import Location
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.registry import Decision
from bincount.contracts.serving import BatchTransformSummary, EndpointRecord, RolloutStrategy, ScalingConfig
from bincount.contracts.training import JobCost
from bincount.evaluation import Evaluation
from bincount.sagemaker.costs import endpoint_cost
from bincount.storage import join_uri
from flows.batch_transform import batch_transform
from flows.data import DataOptions, prepare_data
from flows.promotion import (
    Challenger,
    DeployOptions,
    LiveAccuracy,
    Promotion,
    PromotionPolicy,
    decision_figures,
    live_accuracy,
    promote_trained,
    recipe,
)
from flows.train import TrainOptions, optimize_for_serving, train_model
from tasks.batch_transform import scoring_sentence
from tasks.summary import run_summary


class PipelineResult(BaseModel):
    dataset_split_uri: str
    model_uri: str
    model_version: str
    evaluation: Evaluation
    endpoint: EndpointRecord | None
    """The endpoint after the run (whatever serves it); None where none exists."""
    batch_transform: BatchTransformSummary | None
    training_cost: JobCost | None = None
    tuning_cost: JobCost | None = None
    deployment: str = "not deployed"
    """What the deploy did, in words: a new endpoint, the version replaced, or nothing (it already served)."""
    approval: str = "-"
    """Who approved (or rejected) the version and why: the gate itself, or the person who answered."""
    decision: Decision | None = None
    """The promotion decision: against what served, by the paired test, where a version served."""
    live: LiveAccuracy | None = None
    """The serving model's live accuracy on labelled traffic when the run started (the monitor's last report)."""


def pipeline_figures(result: PipelineResult) -> dict[str, Any]:
    """The run summary's key figures."""
    endpoint, scored = result.endpoint, result.batch_transform
    figures: dict[str, Any] = {
        "test images": result.evaluation.images,
        "test accuracy": result.evaluation.accuracy,
        "test RMSE": result.evaluation.rmse,
        "model version": result.model_version,
        "training cost": result.training_cost.summary() if result.training_cost else "not reported by the backend",
        "tuning cost": result.tuning_cost.summary() if result.tuning_cost else "not reported by the backend",
        "endpoint cost so far": cost.summary() if (cost := endpoint and endpoint_cost(endpoint)) else "-",
        "endpoint": f"{endpoint.name} at {endpoint.url}" if endpoint else "not deployed",
        "approval": result.approval,
        "deployment": result.deployment,
        "batch transform": f"{scoring_sentence(scored)} -> {scored.output_uri}" if scored else "-",
    }
    return figures | (decision_figures(result.decision, result.live) if result.decision else {})


def approval_sentence(promotion: Promotion) -> str:
    """Who approved (or rejected) the version and why; "-" where nobody was asked (it was not promoted)."""
    answer = next((event for event in reversed(promotion.version.history) if event.approval is not None), None)
    return "-" if answer is None else f"{answer.approval} by {answer.actor}: {answer.reason}"


def deployment_sentence(promotion: Promotion) -> str:
    """What the promotion did to the endpoint, in words."""
    decision, version, endpoint = promotion.decision, promotion.version, promotion.endpoint
    if decision.outcome == "nothing-new" and version.stage == "production":
        return f"{version.ref} already serves {decision.endpoint_name!r}: nothing redeployed"
    if not decision.promoted:
        return f"not deployed ({decision.outcome}): {decision.reason}"
    if version.stage != "production" and endpoint is not None:
        return f"{version.ref} shadows {endpoint.model_ref or endpoint.version}: promote it to serve"
    if decision.serving_version is None:
        return f"{version.ref} on a new endpoint"
    return f"{version.ref} replaced {decision.endpoint_name}:{decision.serving_version}"


SUMMARY = run_summary(pipeline_figures)


@flow(name="bincount-pipeline", on_completion=[SUMMARY], on_failure=[SUMMARY])
def pipeline(
    data: DataOptions = DataOptions(),
    training: TrainOptions = TrainOptions(),
    endpoint_name: str = "bincount",
    min_accuracy: float = 0.0,
    require_approval: bool = False,
    approval_timeout_s: int = 24 * 3600,
    location: Location = Location(),
    refresh: bool = False,
    data_capture_percentage: Annotated[int | None, Field(ge=0, le=100)] = None,
    deploy_strategy: RolloutStrategy | None = None,
    scaling: ScalingConfig | None = None,
    optimize: bool = True,
) -> PipelineResult:
    """Download, split, upload, tune, retrain, evaluate, optimize, register, deploy and batch-transform.

    Args:
        data: what to download and how to split it.
        training: model, hyperparameters, search space and budget, debugger and profiler.
        endpoint_name: the endpoint to create or update; also the model group the model is registered in.
        min_accuracy: the quality gate: a model below this test accuracy is rejected, not deployed. Above it, where a
            version serves the endpoint, the new model replaces it only when a paired test on the same test images
            finds it better (exact McNemar at 95%, at least one point of accuracy more).
        require_approval: wait for a person to approve the model in the Prefect UI before it is deployed.
        approval_timeout_s: with require_approval, reject the model when nobody answers within this.
        location: the profile (local or aws), source bucket, artifact root, S3 endpoint and region
            (default: the BINCOUNT_* variables; what is given here wins).
        refresh: run every stage again instead of using cached results.
        data_capture_percentage: share of the endpoint's requests captured for monitoring, 0-100 (0: off;
            default: keep the endpoint's setting, off for a new endpoint).
        deploy_strategy: how traffic moves to the new model: all-at-once (default), canary or linear (rolled back
            by itself when worse than the serving model), or shadow (promoted later by
            `bincount endpoints promote-shadow`).
        scaling: the endpoint's replicas and autoscaling bounds (default: keep the endpoint's, one for a new one).
        optimize: quantize the model to int8 (OpenVINO) for CPU serving and register and deploy that when
            it passes parity on the test side; it keeps the eager model otherwise (False: always eager).
    """
    check_endpoint_name(endpoint_name)  # before hours of training, not at deploy time
    settings = location.settings()

    prepared = prepare_data(data, Location.of(settings), refresh)
    trained = train_model(prepared.channels, training, settings)
    if optimize:
        trained = optimize_for_serving(settings, trained, prepared.channels)
    live = live_accuracy(settings, endpoint_name)
    promotion = promote_trained(
        settings,
        endpoint_name,
        Challenger(trained, prepared.split_uri, prepared.channels["test"], recipe(data, training, settings)),
        PromotionPolicy(
            "pipeline",
            min_accuracy=min_accuracy,
            require_approval=require_approval,
            approval_timeout_s=approval_timeout_s,
        ),
        DeployOptions(data_capture_percentage, deploy_strategy, scaling),
        live,
    )
    deployed = promotion.decision.promoted or promotion.version.stage == "production"  # a shadow too
    scored = (
        batch_transform(
            input_uri=prepared.channels["test"],
            output_uri=join_uri(settings.artifact_uri("batch-transform"), trained.job_name),
            model_uri=trained.model_uri,
            labels_uri=prepared.split_uri,
            location=Location.of(settings),
        )
        if deployed
        else None
    )
    return PipelineResult(
        dataset_split_uri=prepared.split_uri,
        model_uri=trained.model_uri,
        model_version=str(promotion.version.ref),
        evaluation=trained.evaluation,
        endpoint=promotion.endpoint,
        batch_transform=scored,
        training_cost=trained.cost,
        tuning_cost=trained.tuning.cost if trained.tuning else None,
        deployment=deployment_sentence(promotion),
        approval=approval_sentence(promotion),
        decision=promotion.decision,
        live=live,
    )
