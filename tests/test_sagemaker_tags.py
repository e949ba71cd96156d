"""Cost per run: every training job, tuning job, model, endpoint config, endpoint and model package the project
creates on SageMaker carries tags (project, flow run, model group and version where known), read from the
requests as the SDK sends them (validated against botocore's service model: tag keys and values have
patterns and lengths of their own)."""

from __future__ import annotations

import uuid

import pytest
from sagemaker_moto import Captured, MotoSageMaker, prediction, queue_answers, spec
from test_sagemaker_model_registry import register_spec

from bincount.config import Settings
from bincount.contracts.naming import job_name
from bincount.contracts.tuning import SEEDS_SEARCH_SPACE, TuningSpec
from bincount.registry import StorageModelRegistry
from bincount.sagemaker.model_registry import SageMakerModelRegistry
from bincount.sagemaker.serving import SageMakerServingBackend
from bincount.sagemaker.session import SageMakerOptions, resource_tags
from bincount.sagemaker.training import SageMakerTrainingBackend
from bincount.sagemaker.tuning import SageMakerTuningBackend
from bincount.storage import storage_for
from sm_scripts.metric_format import OBJECTIVE_METRIC

RUN = "0b9a7c1e-4f5d-4e8a-9c2b-1d3e5f7a9b0c"


def tags(request: dict) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in request.get("Tags", [])}


@pytest.fixture
def flow_run(monkeypatch: pytest.MonkeyPatch) -> str:
    """The flow run as Prefect's runner leaves it in a deployment run's process."""
    monkeypatch.delenv("BINCOUNT_FLOW_RUN_ID", raising=False)
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", RUN)
    return RUN


def test_training_and_tuning_jobs_carry_the_project_and_the_flow_run(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker, flow_run: str
) -> None:
    trainer = SageMakerTrainingBackend(settings, options)
    captured = Captured(trainer.session.sagemaker_client)
    trainer.train(spec(settings, job_name("retrain", uuid.uuid4().hex)))
    (training,) = captured("CreateTrainingJob")
    assert tags(training) == {"project": "bincount", "flow-run-id": flow_run}

    tuner = SageMakerTuningBackend(settings, options, session=trainer.session)
    tuning_spec = TuningSpec(
        name=job_name("tune", uuid.uuid4().hex, kind="tuning"),
        space=SEEDS_SEARCH_SPACE,
        static_hyperparameters={"arch": "resnet18"},
        channels=spec(settings, "x").channels,
        output_uri=settings.artifact_uri("tuning"),
        max_jobs=2,
        max_parallel_jobs=1,
        objective_metric=OBJECTIVE_METRIC,
    )
    tuner_sdk, channels = tuner.tuner(tuning_spec)
    tuner_sdk.fit(channels, job_name=tuning_spec.name, wait=False)
    (tuning,) = captured("CreateHyperParameterTuningJob")  # SageMaker copies these to each trial's training job
    assert tags(tuning) == {"project": "bincount", "flow-run-id": flow_run}


def test_a_deploy_tags_its_model_endpoint_config_and_endpoint(
    settings: Settings,
    options: SageMakerOptions,
    models: dict[int, str],
    moto_sagemaker: MotoSageMaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BINCOUNT_FLOW_RUN_ID", RUN)  # as a task sets it for a flow run in this process
    backend = SageMakerServingBackend(settings, options)
    captured = Captured(backend.client)
    name = f"bincount-tags-{uuid.uuid4().hex[:8]}"
    queue_answers(prediction(2))
    record = backend.deploy(name, models[1], "bincount-tags:7")
    expected = {
        "project": "bincount",
        "flow-run-id": RUN,
        "endpoint": name,
        "model-group": "bincount-tags",
        "model-version": "7",
        "model-weights": record.version,
    }
    (model,) = captured("CreateModel")
    (config,) = captured("CreateEndpointConfig")
    (endpoint,) = captured("CreateEndpoint")
    assert tags(model) == tags(config) == tags(endpoint) == expected


def test_model_packages_carry_their_group_version_and_flow_run(
    settings: Settings, options: SageMakerOptions, flow_run: str
) -> None:
    storage = storage_for(settings)
    mirror = SageMakerModelRegistry(settings, options)
    captured = Captured(mirror.client)
    group = f"bincount-{uuid.uuid4().hex[:8]}"
    version = StorageModelRegistry(storage, settings.artifact_root, mirror=mirror).register(
        group, register_spec(storage, settings, 3)
    )
    (group_request,) = captured("CreateModelPackageGroup")
    (package,) = captured("CreateModelPackage")
    assert tags(group_request) == {"project": "bincount", "flow-run-id": flow_run, "model-group": group}
    assert tags(package) == {
        "project": "bincount",
        "flow-run-id": version.spec.flow_run_id,  # the registered version's own run, over the process's
        "model-group": group,
        "model-version": "1",
    }


def test_tag_values_are_cut_to_what_sagemaker_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BINCOUNT_FLOW_RUN_ID", raising=False)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    assert resource_tags(endpoint="a,b;c" + "x" * 300, model_group=None) == [
        {"Key": "project", "Value": "bincount"},
        {"Key": "endpoint", "Value": ("a_b_c" + "x" * 300)[:256]},
    ]
