"""Flow: the whole pipeline, from a manifest to a serving endpoint and scored images.

    prepare-data ─► train-model ─► optimize-model ─► register-model ─► quality gate ─► approve ─► deploy ─►
    (download,      (tune ─►        (int8 if it      (a version of    (test accuracy  (at once,  (blue/
     split, upload,  retrain ─►      passes parity,   the endpoint's   >= min_         or a       green,
     report)         evaluate)       else eager)      model group)     accuracy)       person)    checked)

    ─► production ─► batch-transform
       (the version   (the test channel,
        it replaced    with the model
        is archived)   just deployed)

Stages run on the backend the profile picks (``local`` here, ``aws`` for SageMaker jobs). Each
stage caches on its inputs (see each flow), so an unchanged re-run is served from cache up to the
first stage whose inputs changed; ``refresh=True`` runs everything again. The deploy is never
cached; a re-run whose model already serves deploys nothing, and says so. Every trained model is
registered with its lineage (data, code, recipe, job, this run) and scored as it serves (int8 where
it serves int8); one that fails the gate is rejected, and only a model that reached production
updates the best hyperparameters.
"""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from bincount.config import Location, Settings
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.serving import BatchTransformSummary, EndpointRecord, RolloutStrategy, ScalingConfig
from bincount.contracts.training import JobCost
from bincount.evaluation import Evaluation
from bincount.factory import get_model_registry
from bincount.storage import join_uri
from flows.batch_transform import batch_transform
from flows.data import DataOptions, prepare_data
from flows.promotion import approve_version, put_in_production
from flows.train import TrainOptions, optimize_for_serving, train_model
from tasks.batch_transform import scoring_sentence
from tasks.registry import register_model_task, set_approval_task
from tasks.summary import run_summary


class QualityGateError(RuntimeError):
    """The new model scored below the bar: it was rejected and not deployed."""


class PipelineResult(BaseModel):
    dataset_split_uri: str
    model_uri: str
    model_version: str
    evaluation: Evaluation
    endpoint: EndpointRecord | None
    batch_transform: BatchTransformSummary | None
    training_cost: JobCost | None = None
    deployment: str = "not deployed"
    """What the deploy did, in words: a new endpoint, the version replaced, or nothing (it already served)."""
    approval: str = "-"
    """Who approved (or rejected) the version and why: the gate itself, or the person who answered."""


def recipe(data: DataOptions, training: TrainOptions, settings: Settings) -> dict[str, Any]:
    """How to make the model again: what a nightly run with no parameters reads back from the registry."""
    return {
        "data": data.model_dump(mode="json"),
        "training": training.model_dump(mode="json"),
        "location": settings.model_dump(mode="json", include={"source_uri", "source_anonymous", "s3_endpoint_url"}),
    }


def pipeline_figures(result: PipelineResult) -> dict[str, Any]:
    """The run summary's key figures."""
    endpoint, scored = result.endpoint, result.batch_transform
    return {
        "test images": result.evaluation.images,
        "test accuracy": result.evaluation.accuracy,
        "test RMSE": result.evaluation.rmse,
        "model version": result.model_version,
        "training cost": result.training_cost.summary() if result.training_cost else "not reported by the backend",
        "endpoint": f"{endpoint.name} at {endpoint.url}" if endpoint else "not deployed (rejected)",
        "approval": result.approval,
        "deployment": result.deployment,
        "batch transform": f"{scoring_sentence(scored)} -> {scored.output_uri}" if scored else "-",
    }


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
        min_accuracy: the quality gate: a model below this test accuracy is rejected, not deployed.
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
    logger = get_run_logger()
    check_endpoint_name(endpoint_name)  # before hours of training, not at deploy time
    settings = location.settings()

    prepared = prepare_data(data, Location.of(settings), refresh)
    trained = train_model(prepared.channels, training, settings)
    if optimize:
        trained = optimize_for_serving(settings, trained, prepared.channels)
    version = register_model_task(
        settings,
        endpoint_name,
        trained.model_uri,
        trained.evaluation,
        prepared.split_uri,
        trained.hyperparameters,
        trained.job_name,
        recipe(data, training, settings),
    )
    accuracy = trained.evaluation.accuracy
    if accuracy < min_accuracy:
        set_approval_task(
            settings, version, False, "quality-gate", f"test accuracy {accuracy:.4f} < min_accuracy {min_accuracy:.4f}"
        )
        raise QualityGateError(
            f"test accuracy {accuracy:.3f} is below min_accuracy {min_accuracy:.3f}: {version.ref} was rejected and "
            "not "
            "deployed. Tune longer, or lower min_accuracy if this bar is too high for the data."
        )
    passed = f"test accuracy {accuracy:.4f} >= min_accuracy {min_accuracy:.4f}"
    version = approve_version(settings, version, require_approval, approval_timeout_s, passed)
    answer = version.history[-1]
    approval = f"{version.approval} by {answer.actor}: {answer.reason}"
    if version.approval != "Approved":
        logger.warning("%s was rejected (%s): nothing deployed", version.ref, version.history[-1].reason)
        return PipelineResult(
            dataset_split_uri=prepared.split_uri,
            model_uri=trained.model_uri,
            model_version=str(version.ref),
            evaluation=trained.evaluation,
            endpoint=None,
            batch_transform=None,
            training_cost=trained.cost,
            deployment=f"not deployed: {version.ref} was rejected",
            approval=approval,
        )
    registry = get_model_registry(settings)
    serving = registry.production(endpoint_name)
    if serving is not None and serving.version == version.version:
        deployment = f"{version.ref} already serves {endpoint_name!r}: nothing redeployed"
        logger.info(
            "%s passed the gate (%s) and already serves %r: nothing to redeploy", version.ref, passed, endpoint_name
        )
    else:
        deployment = f"{version.ref} replaced {serving.ref}" if serving else f"{version.ref} on a new endpoint"
        logger.info("%s passed the gate (%s): deploying it to %r", version.ref, passed, endpoint_name)
    endpoint = put_in_production(
        settings,
        endpoint_name,
        version,
        f"deployed by the pipeline: {passed}",
        data_capture_percentage,
        deploy_strategy,
        scaling,
    )
    if registry.get(endpoint_name, version.version).stage == "production":  # not a shadow still waiting
        registry.save_best_hyperparameters(
            endpoint_name, trained.hyperparameters, trained.job_name, trained.evaluation.to_dict(), version.version
        )
    else:
        deployment = f"{version.ref} shadows {endpoint.model_ref or endpoint.version}: promote it to serve"
    scored = batch_transform(
        input_uri=prepared.channels["test"],
        output_uri=join_uri(settings.artifact_uri("batch-transform"), trained.job_name),
        model_uri=trained.model_uri,
        labels_uri=prepared.split_uri,
        location=Location.of(settings),
    )
    return PipelineResult(
        dataset_split_uri=prepared.split_uri,
        model_uri=trained.model_uri,
        model_version=str(version.ref),
        evaluation=trained.evaluation,
        endpoint=endpoint,
        batch_transform=scored,
        training_cost=trained.cost,
        deployment=deployment,
        approval=approval,
    )
