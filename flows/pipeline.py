"""Flow: the whole pipeline, from a manifest to a serving endpoint and scored images.

    prepare-data ──► train-model ──────────────────────────────────► quality gate ──► deploy ──► batch-transform
    (download,       (tune ─► retrain with debugger ─► evaluate     (test accuracy    (blue/     (the test channel,
     split, upload,          and profiler          on test)          >= min_accuracy)  green,     through the new
     report)                                                                           checked)   model)

Stages run on the backend the profile picks (``local`` here, ``aws`` for SageMaker jobs). Each
stage caches on its inputs (see each flow), so an unchanged re-run is served from cache up to the
first stage whose inputs changed; ``refresh=True`` runs everything again. The deploy is never
cached. The best hyperparameters are kept in the registry for the nightly retrain.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel

from bincount.config import Location
from bincount.contracts.serving import BatchTransformSummary, EndpointRecord
from bincount.evaluation import Evaluation
from bincount.registry import Registry
from bincount.storage import join_uri
from flows.batch_transform import batch_transform
from flows.data import DataOptions, prepare_data
from flows.train import TrainOptions, train_model
from tasks.deploy import deploy_model


class QualityGateError(RuntimeError):
    """The new model scored below the bar: it was not deployed."""


class PipelineResult(BaseModel):
    dataset_split_uri: str
    model_uri: str
    evaluation: Evaluation
    endpoint: EndpointRecord
    batch_transform: BatchTransformSummary


@flow(name="bincount-pipeline")
def pipeline(
    data: DataOptions = DataOptions(),
    training: TrainOptions = TrainOptions(),
    endpoint_name: str = "bincount",
    min_accuracy: float = 0.0,
    location: Location = Location(),
    refresh: bool = False,
) -> PipelineResult:
    """Download, split, upload, tune, retrain, evaluate, deploy and batch-transform.

    Args:
        data: what to download and how to split it.
        training: model, hyperparameters, search space and budget, debugger and profiler.
        endpoint_name: the endpoint to create or update with the new model.
        min_accuracy: the quality gate: test accuracy below this stops the run before deploying.
        location: the profile (local or aws), source bucket, artifact root, S3 endpoint and region
            (default: the BINCOUNT_* variables; what is given here wins).
        refresh: run every stage again instead of using cached results.
    """
    logger = get_run_logger()
    settings = location.settings()

    prepared = prepare_data(data, Location.of(settings), refresh)
    trained = train_model(prepared.channels, training, settings)
    accuracy = trained.evaluation.accuracy
    if accuracy < min_accuracy:
        raise QualityGateError(
            f"test accuracy {accuracy:.3f} is below min_accuracy {min_accuracy:.3f}: {trained.model_uri} was not deployed. "
            "Tune longer, or lower min_accuracy if this bar is too high for the data."
        )
    logger.info("Test accuracy %.3f passes the gate (%.3f): deploying to %r", accuracy, min_accuracy, endpoint_name)
    Registry(settings, endpoint_name).save_best_hyperparameters(
        trained.hyperparameters, trained.job_name, trained.evaluation.to_dict()
    )
    endpoint = deploy_model(settings, endpoint_name, trained.model_uri)
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
        evaluation=trained.evaluation,
        endpoint=endpoint,
        batch_transform=scored,
    )
