"""The SageMaker backend through the real SageMaker SDK, against moto's S3 and SageMaker APIs on loopback.

No AWS here: every request goes over HTTP to moto's server (``LoopbackS3`` serves moto's whole
backend app). Requests are captured as the SDK sends them and validated by botocore against the
real service model. moto's SageMaker answers are canned (every job is Completed at once), so where
a test needs behaviour moto does not model (a job that runs, fails or is stopped, UpdateEndpoint,
StopTrainingJob, ListTrainingJobsForHyperParameterTuningJob, the .out files a transform container
writes) the test drives moto's backend state directly, in the fixtures below, and says so.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import tarfile
import time
import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError
from sagemaker_moto import (
    ACCOUNT,
    BUCKET,
    REGION,
    ROLE,
    Captured,
    MotoSageMaker,
    decoded,
    prediction,
    queue_answers,
    sagemaker_state,
    spec,
)

from bincount.config import Settings
from bincount.contracts.naming import job_name
from bincount.contracts.serving import DeployError, EndpointNotFoundError
from bincount.contracts.training import DEBUGGER_RULES, TrainingJob, TrainingJobFailed, TrainingJobSpec
from bincount.contracts.tuning import SEEDS_SEARCH_SPACE, TuningSpec
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.factory import get_serving_backend, get_training_backend, get_tuning_backend
from bincount.sagemaker.serving import SageMakerServingBackend
from bincount.sagemaker.session import SageMakerOptions
from bincount.sagemaker.training import SageMakerTrainingBackend, price_table
from bincount.sagemaker.tuning import SageMakerTuningBackend
from bincount.sagemaker.waiting import (
    TRAINING_JOB,
    TRAINING_LOG_GROUP,
    TRANSFORM_LOG_GROUP,
    Backoff,
    LogFollower,
    SageMakerJobFailed,
    SageMakerWaitTimeout,
    wait_for,
)
from sm_scripts.metric_format import METRIC_DEFINITIONS, OBJECTIVE_METRIC

RULE_NAMES = {"LossNotDecreasing", "Overfit", "Overtraining", "VanishingGradient", "PoorWeightInitialization"}


# --- names and credentials ---------------------------------------------------------------------
def test_credentials_given_as_options(settings: Settings) -> None:
    from bincount.sagemaker.session import boto_session

    options = SageMakerOptions.load(
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="wJalrXUtnFEMI/K7MDENG",
        aws_session_token="token",
        endpoint_url="http://127.0.0.1:1",
    )
    session = boto_session(settings, options)
    credentials = session.get_credentials().get_frozen_credentials()
    assert (credentials.access_key, credentials.secret_key, credentials.token) == (
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG",
        "token",
    )
    assert session.client("sagemaker").meta.endpoint_url == "http://127.0.0.1:1"
    assert session.client("s3").meta.endpoint_url == settings.s3_endpoint_url
    assert "wJalr" not in repr(options)  # secrets stay out of logs and Prefect parameters


# --- request shapes -------------------------------------------------------------------------
def test_training_job_request_with_the_debugger_service_profiler_and_spot(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    # An account that still has SageMaker's Debugger service, and says so.
    backend = SageMakerTrainingBackend(
        settings, options.model_copy(update={"use_spot": True, "train_instance_count": 2, "sagemaker_debugger": True})
    )
    captured = Captured(backend.session.sagemaker_client)
    name = job_name("retrain", uuid.uuid4().hex)
    job = backend.train(spec(settings, name, debugger=True, profiler=True))

    (request,) = captured("CreateTrainingJob")
    assert decoded(request["HyperParameters"]) == {
        "lr": 0.05,
        "batch-size": 64,
        "epochs": 3,
        "arch": "resnet50",
        "debugger": True,
        "profile": True,
        "checkpoint-dir": "/opt/ml/checkpoints",  # spot: train.py resumes from what SageMaker syncs to CheckpointConfig
        # Two GPU instances: data-parallel under SageMaker's torchrun launcher (one train.py process per GPU).
        "sagemaker_torch_distributed_enabled": True,
        "sagemaker_instance_type": "ml.g5.xlarge",
        "sagemaker_program": "train.py",
        "sagemaker_container_log_level": 20,
        "sagemaker_job_name": name,
        "sagemaker_region": REGION,
        "sagemaker_submit_directory": f"{settings.artifact_uri('jobs')}/{name}/source/sourcedir.tar.gz",
    }
    assert request["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    assert request["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"  # no copy of the channels first
    assert {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]} == {
        split: settings.artifact_uri("datasets", "demo", "channels", split) + "/"
        for split in ("train", "valid", "test")
    }
    assert request["ResourceConfig"] == {"InstanceType": "ml.g5.xlarge", "InstanceCount": 2, "VolumeSizeInGB": 30}
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 4 * 3600, "MaxWaitTimeInSeconds": 8 * 3600}
    assert request["EnableManagedSpotTraining"] is True
    assert request["CheckpointConfig"]["S3Uri"] == f"{settings.artifact_uri('jobs')}/{name}/checkpoints"
    collections = [c["CollectionName"] for c in request["DebugHookConfig"]["CollectionConfigurations"]]
    assert {"losses", "gradients", "weights"} <= set(collections) and len(collections) == len(set(collections))
    assert request["DebugHookConfig"]["S3OutputPath"] == settings.artifact_uri("jobs")
    rules = {r["RuleConfigurationName"]: r["RuleParameters"] for r in request["DebugRuleConfigurations"]}
    assert set(rules) == RULE_NAMES
    assert rules["Overtraining"] == {
        "rule_to_invoke": "Overtraining",
        **{key: str(value) for key, value in DEBUGGER_RULES["overtraining"].items()},
    }
    assert request["ProfilerConfig"]["ProfilingIntervalInMilliseconds"] == 500
    assert "ProfilingParameters" not in request["ProfilerConfig"]  # system monitoring only
    assert not request["ProfilerConfig"].get("DisableProfiler")

    # The code SageMaker runs is sm_scripts/, uploaded beside the job's outputs.
    s3 = backend.session.boto_session.client("s3")
    archive = s3.get_object(Bucket=BUCKET, Key=f"bincount/jobs/{name}/source/sourcedir.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert {"train.py", "metric_format.py", "inference.py"} <= set(tar.getnames())
    assert job.model_uri == f"{settings.artifact_uri('jobs')}/{name}/output/model.tar.gz"
    assert job.output_uri == f"{settings.artifact_uri('jobs')}/{name}/output/output.tar.gz"
    assert job.debug_output_uri == f"{settings.artifact_uri('jobs')}/{name}/debug-output"


def test_plain_training_job_has_no_debugger_and_no_profiler(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    backend = SageMakerTrainingBackend(settings, options)
    captured = Captured(backend.session.sagemaker_client)
    name = job_name("train", uuid.uuid4().hex)
    # What SageMaker reports after a job: the metric definitions' final values and the billable time.
    moto_sagemaker.scripts[name] = [
        {
            "final_metric_data_list": [
                {"MetricName": "eval:accuracy", "Value": 0.42, "Timestamp": "2026-01-01T00:00:00Z"},
                {"MetricName": "epoch", "Value": 3.0, "Timestamp": "2026-01-01T00:00:00Z"},
            ],
            "training_time_in_seconds": 321,
        }
    ]
    job = backend.train(spec(settings, name))
    assert (job.status, job.metrics, job.duration_s) == ("Completed", {"eval:accuracy": 0.42, "epoch": 3.0}, 321.0)
    (request,) = captured("CreateTrainingJob")
    assert "DebugHookConfig" not in request and "DebugRuleConfigurations" not in request
    assert request["ProfilerConfig"] == {"DisableProfiler": True}
    assert "EnableManagedSpotTraining" not in request
    assert "debugger" not in request["HyperParameters"] and "profile" not in request["HyperParameters"]
    assert "sagemaker_torch_distributed_enabled" not in request["HyperParameters"]  # one GPU: one process


@pytest.mark.parametrize(
    ("instance_type", "count", "devices"),
    [("ml.g5.xlarge", 1, 1), ("ml.g5.12xlarge", 1, 4), ("ml.p4d.24xlarge", 2, 16), ("ml.c5.xlarge", 1, 1)],
)
def test_data_parallel_jobs_count_every_gpu(
    settings: Settings, options: SageMakerOptions, instance_type: str, count: int, devices: int
) -> None:
    backend = SageMakerTrainingBackend(
        settings, options.model_copy(update={"train_instance_type": instance_type, "train_instance_count": count})
    )
    assert backend.devices_per_job() == devices
    estimator = backend.estimator(spec(settings, job_name("train", uuid.uuid4().hex)))
    enabled = estimator.hyperparameters().get("sagemaker_torch_distributed_enabled")  # JSON-encoded by the SDK
    assert enabled == ("true" if devices > 1 else None)


def test_several_cpu_instances_are_refused_before_any_job(settings: Settings, options: SageMakerOptions) -> None:
    backend = SageMakerTrainingBackend(
        settings, options.model_copy(update={"train_instance_type": "ml.c5.4xlarge", "train_instance_count": 2})
    )
    with pytest.raises(ValueError, match=r"ml.c5.4xlarge, which has no GPU.*Use one instance, or a GPU type"):
        backend.estimator(spec(settings, job_name("train", uuid.uuid4().hex)))


def test_tuning_job_request_and_best_hyperparameters_read_back(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    assert isinstance(get_tuning_backend(settings), SageMakerTuningBackend)
    backend = SageMakerTuningBackend(settings, options)
    captured = Captured(backend.session.sagemaker_client)
    name = job_name("tune", uuid.uuid4().hex, kind="tuning")
    tuning = TuningSpec(
        name=name,
        space=SEEDS_SEARCH_SPACE,
        static_hyperparameters={"arch": "resnet50", "weights": "none"},
        channels=spec(settings, "x").channels,
        output_uri=settings.artifact_uri("tuning"),
        max_jobs=12,
        max_parallel_jobs=3,
        objective_metric=OBJECTIVE_METRIC,
    )
    # moto's tuning job names a made-up best trial with made-up values: put in what SageMaker reports
    # (the SDK's JSON-encoded strings) and the trial it names, as SageMaker would after the search.
    best_trial = f"{name}-003-0123abcd"
    state = sagemaker_state()
    original = type(state).create_hyper_parameter_tuning_job

    def create(backend_: Any, **kwargs: Any) -> str:
        arn = original(backend_, **kwargs)
        job = backend_.hyper_parameter_tuning_jobs[kwargs["hyper_parameter_tuning_job_name"]]
        job.best_training_job = {
            "TrainingJobName": best_trial,
            "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:training-job/{best_trial}",
            "CreationTime": job.creation_time,
            "TrainingJobStatus": "Completed",
            "TunedHyperParameters": {"lr": "0.0421", "batch-size": '"128"', "epochs": "7"},
            "FinalHyperParameterTuningJobObjectiveMetric": {"MetricName": OBJECTIVE_METRIC, "Value": 0.61},
        }
        for trial in (best_trial, stopped_trial):
            state.create_training_job(
                training_job_name=trial,
                hyper_parameters={},
                algorithm_specification={},
                role_arn=ROLE,
                input_data_config=[],
                output_data_config={"S3OutputPath": spec(settings, trial).output_uri},
                resource_config={},
                vpc_config={},
                stopping_condition={},
                tags=[],
                enable_network_isolation=False,
                enable_inter_container_traffic_encryption=False,
                enable_managed_spot_training=False,
                checkpoint_config={},
                debug_hook_config={},
                debug_rule_configurations=[],
                tensor_board_output_config={},
                experiment_config={},
            )
        return arn

    # What SageMaker's DescribeTrainingJob says each trial ran and billed (moto's says neither).
    stopped_trial = f"{name}-001-aaaa0000"
    resources = {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30}
    moto_sagemaker.billed[best_trial] = {
        "ResourceConfig": resources,
        "TrainingTimeInSeconds": 1200,
        "BillableTimeInSeconds": 1200,
    }
    moto_sagemaker.billed[stopped_trial] = {
        "ResourceConfig": resources,
        "TrainingTimeInSeconds": 300,
        "BillableTimeInSeconds": 300,
    }

    moto_sagemaker.trials[name] = [
        {
            "TrainingJobName": best_trial,
            "TrainingJobArn": "arn",
            "CreationTime": "2026-01-01T00:00:00Z",
            "TrainingJobStatus": "Completed",
            "TunedHyperParameters": {"lr": "0.0421", "batch-size": '"128"', "epochs": "7"},
            "FinalHyperParameterTuningJobObjectiveMetric": {"MetricName": OBJECTIVE_METRIC, "Value": 0.61},
        },
        {
            "TrainingJobName": stopped_trial,
            "TrainingJobArn": "arn",
            "CreationTime": "2026-01-01T00:00:00Z",
            "TrainingJobStatus": "Stopped",
            "TunedHyperParameters": {"lr": "0.09", "batch-size": '"32"', "epochs": "2"},
        },
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(state), "create_hyper_parameter_tuning_job", create)
        result = backend.tune(tuning)

    (request,) = captured("CreateHyperParameterTuningJob")
    config = request["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian"
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 12, "MaxParallelTrainingJobs": 3}
    assert config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "eval:accuracy"}
    ranges = config["ParameterRanges"]
    assert ranges["ContinuousParameterRanges"] == [
        {"Name": "lr", "MinValue": "0.01", "MaxValue": "0.1", "ScalingType": "Logarithmic"}
    ]
    assert [(r["Name"], r["MinValue"], r["MaxValue"]) for r in ranges["IntegerParameterRanges"]] == [
        ("epochs", "1", "10")
    ]
    assert [(r["Name"], [json.loads(v) for v in r["Values"]]) for r in ranges["CategoricalParameterRanges"]] == [
        ("batch-size", ["32", "64", "128"])
    ]
    definition = request["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    static = decoded(definition["StaticHyperParameters"])
    assert static["arch"] == "resnet50" and static["weights"] == "none" and static["sagemaker_program"] == "train.py"
    assert not {"lr", "batch-size", "epochs"} & set(static)
    assert definition["HyperParameterTuningResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert [c["ChannelName"] for c in definition["InputDataConfig"]] == ["train", "valid", "test"]

    assert result.best_training_job == best_trial
    assert result.best_hyperparameters == {
        "arch": "resnet50",
        "weights": "none",
        "lr": 0.0421,
        "batch-size": 128,
        "epochs": 7,
    }
    assert result.best_objective == pytest.approx(0.61)
    assert result.best_model_uri == f"{settings.artifact_uri('jobs')}/{best_trial}/output/model.tar.gz"
    assert [(t.status, t.hyperparameters["batch-size"]) for t in result.trials] == [
        ("Completed", 128),
        ("Stopped", 32),
    ]  # best first
    # Both trials' billed seconds at the price table's rate for their instance type.
    hourly = price_table()["per_instance_hour"]["ml.g5.xlarge"]
    assert result.cost is not None and (result.cost.billed_s, result.cost.jobs) == (1500, 2)
    assert result.cost.usd == pytest.approx(1500 / 3600 * hourly, abs=1e-3)
    assert result.cost.summary() == f"${result.cost.usd:.2f} (1 x ml.g5.xlarge, 1500 instance-s billed over 2 jobs)"

    # A retried tune task follows the tuning job instead of starting a second one.
    backend.tune(tuning)
    assert len(captured("CreateHyperParameterTuningJob")) == 1


def test_tuning_job_without_a_completed_trial_fails_with_its_reason(
    settings: Settings, options: SageMakerOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = sagemaker_state()
    original = type(state).create_hyper_parameter_tuning_job

    def create(backend_: Any, **kwargs: Any) -> str:  # moto's tuning jobs always succeed; this one did not
        arn = original(backend_, **kwargs)
        job = backend_.hyper_parameter_tuning_jobs[kwargs["hyper_parameter_tuning_job_name"]]
        job.hyper_parameter_tuning_job_status, job.best_training_job = "Failed", None
        job.failure_reason = "All training jobs failed: AlgorithmError: channel valid holds no images"
        return arn

    monkeypatch.setattr(type(state), "create_hyper_parameter_tuning_job", create)
    tuning = TuningSpec(
        name=job_name("tune", uuid.uuid4().hex, kind="tuning"),
        space=SEEDS_SEARCH_SPACE,
        static_hyperparameters={},
        channels=spec(settings, "x").channels,
        output_uri=settings.artifact_uri("tuning"),
        max_jobs=2,
        max_parallel_jobs=1,
        objective_metric=OBJECTIVE_METRIC,
    )
    with pytest.raises(SageMakerJobFailed, match="channel valid holds no images"):
        SageMakerTuningBackend(settings, options).tune(tuning)


# --- model, endpoint, transform ---------------------------------------------------------------
def test_deploy_update_roll_back_retry_and_delete(
    sagemaker_env: Settings, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> None:
    backend = get_serving_backend(sagemaker_env)
    assert isinstance(backend, SageMakerServingBackend)
    captured = Captured(backend.client)
    name = f"bincount-test-{uuid.uuid4().hex[:8]}"

    queue_answers(prediction(2))
    first = backend.deploy(name, models[1])
    (model,) = captured("CreateModel")
    container = model["PrimaryContainer"]
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["Image"].endswith("pytorch-inference:2.6.0-cpu-py312")
    assert container["ModelDataUrl"].startswith(f"s3://{BUCKET}/bincount/sagemaker/models/{model['ModelName']}/")
    assert model["ExecutionRoleArn"] == ROLE
    (config,) = captured("CreateEndpointConfig")
    (variant,) = config["ProductionVariants"]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == (
        model["ModelName"],
        "ml.m5.large",
        1,
    )
    (create,) = captured("CreateEndpoint")
    assert create == {
        "EndpointName": name,
        "EndpointConfigName": config["EndpointConfigName"],
        "Tags": config["Tags"],  # project, endpoint, weights (test_sagemaker_tags)
    }
    assert first.backend == "sagemaker" and first.details["endpoint_config"] == config["EndpointConfigName"]
    assert backend.describe(name).version == first.version

    # The repacked model holds inference.py under code/, where the SageMaker PyTorch container looks.
    s3 = backend.session.boto_session.client("s3")
    bucket, key = container["ModelDataUrl"][len("s3://") :].split("/", 1)
    with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())) as tar:
        assert {"model.pt", "model_info.json", "code/inference.py"} <= set(tar.getnames())

    queue_answers(prediction(3))
    second = backend.deploy(name, models[2])
    (update,) = captured("UpdateEndpoint")
    assert update["EndpointName"] == name and update["EndpointConfigName"] == second.details["endpoint_config"]
    assert second.previous_version == first.version
    assert second.details["previous_endpoint_config"] == first.details["endpoint_config"]

    previous_config = second.details["endpoint_config"]
    rolled_back = (
        f"Rolled back: endpoint '{name}' serves its previous config {previous_config} "
        f"\\(model version {second.version}\\) again"
    )
    queue_answers("not a prediction")  # the new model answers nonsense: the deploy rolls back
    with pytest.raises(DeployError, match=f"answer.*{rolled_back}.*fix the model, then deploy again"):
        backend.deploy(name, models[3])
    updates = [u["EndpointConfigName"] for u in captured("UpdateEndpoint")]
    assert len(updates) == 3 and updates[0] == updates[2] == second.details["endpoint_config"] != updates[1]
    assert sagemaker_state().endpoints[name].endpoint_config_name == second.details["endpoint_config"]
    assert backend.describe(name).version == second.version

    # An update SageMaker itself fails (and rolls back) is reported, and not updated again.
    moto_sagemaker.fail_updates = "ClientError: the container did not pass the ping health check"
    with pytest.raises(DeployError, match=f"did not pass the ping health check.*{rolled_back}"):
        backend.deploy(name, models[3])
    moto_sagemaker.fail_updates = None
    assert len(captured("UpdateEndpoint")) == 4
    assert sagemaker_state().endpoints[name].endpoint_config_name == second.details["endpoint_config"]

    # An update that outlives endpoint_timeout_s is rolled back too, once SageMaker lets it
    # (it takes no update while one runs): here the new fleet comes up just after the timeout.
    impatient = SageMakerServingBackend(
        sagemaker_env, backend.options.model_copy(update={"endpoint_timeout_s": 1e-6}), session=backend.session
    )
    moto_sagemaker.endpoint_delays = [1]
    with pytest.raises(DeployError, match=f"still Updating after 0 s. {rolled_back}"):
        impatient.deploy(name, models[3])
    updates = [u["EndpointConfigName"] for u in captured("UpdateEndpoint")]
    assert len(updates) == 6 and updates[4] == updates[1] and updates[5] == second.details["endpoint_config"]
    assert sagemaker_state().endpoints[name].endpoint_config_name == second.details["endpoint_config"]
    assert backend.describe(name).version == second.version

    # A retried deploy of what already serves finds its model and config: nothing new is created.
    before = {
        op: len(captured(op)) for op in ("CreateModel", "CreateEndpointConfig", "CreateEndpoint", "UpdateEndpoint")
    }
    queue_answers(prediction(3))
    again = backend.deploy(name, models[2])
    assert {op: len(captured(op)) for op in before} == before
    assert again.details["endpoint_config"] == second.details["endpoint_config"]

    # An update still running after the rollback's own wait: the error says what to run by hand.
    moto_sagemaker.endpoint_delays = [5]
    with pytest.raises(
        DeployError,
        match=(
            f"Rolling back to config {second.details['endpoint_config']} failed too .*still Updating.*"
            f"aws sagemaker update-endpoint --endpoint-name {name} --endpoint-config-name "
            f"{second.details['endpoint_config']}"
        ),
    ):
        impatient.deploy(name, models[3])
    # The next deploy waits for the running update to finish before it updates the endpoint.
    queue_answers(prediction(3))
    assert backend.deploy(name, models[2]).details["previous_endpoint_config"] == updates[1]
    assert sagemaker_state().endpoints[name].endpoint_config_name == second.details["endpoint_config"]

    backend.delete(name)
    assert name not in sagemaker_state().endpoints
    assert captured("DeleteEndpoint") == [{"EndpointName": name}]
    with pytest.raises(EndpointNotFoundError):
        backend.describe(name)
    with pytest.raises(EndpointNotFoundError):
        backend.delete(name)


def test_a_new_endpoint_that_fails_is_left_with_how_to_delete_it(
    sagemaker_env: Settings, models: dict[int, str], moto_sagemaker: MotoSageMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import main

    backend = get_serving_backend(sagemaker_env)
    assert isinstance(backend, SageMakerServingBackend)
    impatient = SageMakerServingBackend(
        sagemaker_env, backend.options.model_copy(update={"endpoint_timeout_s": 1e-6}), session=backend.session
    )
    for environment, value in {
        "BINCOUNT_PROFILE": "aws",
        "BINCOUNT_ARTIFACT_ROOT": sagemaker_env.artifact_root,
        "BINCOUNT_S3_ENDPOINT_URL": sagemaker_env.s3_endpoint_url,
        "BINCOUNT_AWS_REGION": REGION,
    }.items():
        monkeypatch.setenv(environment, str(value))
    for deployer, setup, state in (
        (backend, lambda: queue_answers("{}"), "InService"),  # answers badly
        (impatient, lambda: moto_sagemaker.endpoint_delays.append(3), "Creating"),
    ):  # too slow
        name = f"bincount-test-{uuid.uuid4().hex[:8]}"
        setup()
        with pytest.raises(
            DeployError,
            match=(
                f"(?s)failed on endpoint '{name}'.*new and never served; it is left as it is \\({state}\\).*"
                f"delete it with `BINCOUNT_PROFILE=aws bincount delete-endpoint {name}`"
            ),
        ):
            deployer.deploy(name, models[1])
        assert name in sagemaker_state().endpoints
        main(["delete-endpoint", name])  # what the message says to run
        assert name not in sagemaker_state().endpoints


def test_batch_transform_request_and_joined_table(
    settings: Settings,
    options: SageMakerOptions,
    models: dict[int, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import numpy as np
    from moto.s3.models import s3_backends

    backend = SageMakerServingBackend(settings, options, run_key=uuid.uuid4().hex)
    captured = Captured(backend.client)
    s3 = backend.session.boto_session.client("s3")
    prefix = f"bincount/transform/{uuid.uuid4().hex}"
    images = {f"{count}/img{count}{i}.jpg": count for count in (1, 2, 3) for i in range(2)}
    for key in images:
        s3.put_object(
            Bucket=BUCKET,
            Key=f"{prefix}/in/{key}",
            Body=jpeg_bytes(render_bin_image(1, np.random.default_rng(0), size=32)),
        )

    # moto completes a transform job without running a container: write the .out files the
    # container would (each image's JSON answer), predicting 2 for every image.
    state = sagemaker_state()
    original = type(state).create_transform_job

    def create_transform_job(backend_: Any, **kwargs: Any) -> Any:
        job = original(backend_, **kwargs)
        for key in images:
            s3_backends[ACCOUNT]["aws"].put_object(BUCKET, f"{prefix}/out/{key}.out", prediction(2).encode())
        return job

    monkeypatch.setattr(type(state), "create_transform_job", create_transform_job)

    # What the transform container logs (a stream per instance, and one for the data plane).
    container_lines = {
        "i-0abc1234": ["Warming up the model", "Model loaded"],
        "i-0abc1234/data-log": ["6 requests, 0 errors"],
    }

    def container_logs(**_: Any) -> None:
        job = captured("CreateTransformJob")[-1]["TransformJobName"]
        for host, lines in container_lines.items():
            put_log_lines(backend.logs_client, TRANSFORM_LOG_GROUP, f"{job}/{host}", lines)

    backend.client.meta.events.register("after-call.sagemaker.CreateTransformJob", container_logs)
    progress: list[tuple[int, int]] = []
    with caplog.at_level(logging.INFO, logger="bincount.sagemaker.serving"):
        summary = backend.batch_transform(
            models[1],
            f"s3://{BUCKET}/{prefix}/in",
            f"s3://{BUCKET}/{prefix}/out",
            progress=lambda d, t: progress.append((d, t)),
        )
    streamed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[i-0abc1234")]
    assert streamed == [f"[{host}] {line}" for host, lines in container_lines.items() for line in lines]
    (request,) = captured("CreateTransformJob")
    assert request["TransformInput"] == {
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/{prefix}/in/"}},
        "ContentType": "application/x-image",
        "SplitType": "None",
    }
    assert request["TransformOutput"] == {
        "S3OutputPath": f"s3://{BUCKET}/{prefix}/out/",
        "Accept": "application/json",
        "AssembleWith": "None",
    }
    assert request["TransformResources"] == {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1}
    assert (request["BatchStrategy"], request["MaxPayloadInMB"], request["MaxConcurrentTransforms"]) == (
        "SingleRecord",
        6,
        4,
    )
    assert request["TransformJobName"].startswith("bincount-transform-")

    assert (summary.images, summary.scored, summary.failed) == (6, 6, 0)
    assert summary.accuracy == pytest.approx(2 / 6, abs=1e-4)
    assert progress == [(0, 6), (6, 6)]
    import pandas as pd

    table = pd.read_csv(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/out/results.csv")["Body"].read()))
    assert list(table.columns) == [
        "id",
        "key",
        "predicted_count",
        "prob_1",
        "prob_2",
        "prob_3",
        "prob_4",
        "prob_5",
        "label",
        "correct",
        "model_version",
    ]
    assert set(table["model_version"].astype(str)) == {summary.model_version}
    assert sorted(table["key"]) == sorted(images) and set(table["predicted_count"]) == {2}
    assert dict(zip(table["key"], table["label"], strict=True)) == images

    # A retried task follows the job it started.
    backend.batch_transform(models[1], f"s3://{BUCKET}/{prefix}/in", f"s3://{BUCKET}/{prefix}/out")
    assert len(captured("CreateTransformJob")) == 1


# --- waiting: transitions, backoff, timeout, interrupt -----------------------------------------
def start_running_job(
    backend: SageMakerTrainingBackend, settings: Settings, moto_sagemaker: MotoSageMaker, states: list[dict]
) -> str:
    name = job_name("train", uuid.uuid4().hex)
    backend.estimator(spec(settings, name)).fit(backend.channels(spec(settings, name)), job_name=name, wait=False)
    moto_sagemaker.scripts[name] = states
    return name


RUNNING = [
    {"training_job_status": "InProgress", "secondary_status": "Starting", "secondary_status_transitions": []},
    {"training_job_status": "InProgress", "secondary_status": "Starting"},
    {
        "training_job_status": "InProgress",
        "secondary_status": "Downloading",
        "secondary_status_transitions": [
            {"Status": "Starting", "StartTime": "2026-01-01T00:00:00Z", "StatusMessage": "Preparing the instances"},
            {"Status": "Downloading", "StartTime": "2026-01-01T00:01:00Z", "StatusMessage": "Downloading input data"},
        ],
    },
    {"training_job_status": "InProgress", "secondary_status": "Training"},
]


def test_wait_logs_transitions_and_backs_off(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    backend = SageMakerTrainingBackend(settings, options)
    name = start_running_job(
        backend,
        settings,
        moto_sagemaker,
        [*RUNNING, {"training_job_status": "Completed", "secondary_status": "Completed"}],
    )
    events: list[str] = []
    sleeps: list[float] = []
    description = wait_for(
        backend.session.sagemaker_client,
        TRAINING_JOB,
        name,
        on_event=events.append,
        timeout_s=60,
        backoff=Backoff(1.0, 2.0, 1.5),
        sleep=sleeps.append,
    )
    assert description["TrainingJobStatus"] == "Completed"
    assert sleeps == [1.0, 1.5, 2.0, 2.0]
    assert events == [
        f"training job {name} is InProgress (Starting)",
        f"training job {name} is InProgress (Downloading)",
        f"training job {name}: Starting: Preparing the instances",
        f"training job {name}: Downloading: Downloading input data",
        f"training job {name} is InProgress (Training)",
        f"training job {name} is Completed (Completed)",
    ]


def test_timeout_and_interrupt_stop_the_job(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    backend = SageMakerTrainingBackend(settings, options.model_copy(update={"job_timeout_s": 0.05}))
    name = job_name("train", uuid.uuid4().hex)
    moto_sagemaker.scripts[name] = [dict(RUNNING[0]) for _ in range(1000)]
    with pytest.raises(SageMakerWaitTimeout, match="asked to stop"):
        backend.train(spec(settings, name))
    assert moto_sagemaker.stopped == [name]

    # Ctrl-C, and what Prefect raises in a flow run's process when the run is cancelled (SIGTERM).
    from prefect.exceptions import TerminationSignal

    for interruption in (KeyboardInterrupt(), TerminationSignal(signal.SIGTERM)):

        def interrupt(line: str, interruption: BaseException = interruption) -> None:
            if "is InProgress" in line:
                raise interruption

        other = job_name("train", uuid.uuid4().hex)
        moto_sagemaker.scripts[other] = [dict(RUNNING[0]) for _ in range(1000)]
        with pytest.raises(type(interruption)):
            SageMakerTrainingBackend(settings, options).train(spec(settings, other), on_log=interrupt)
        assert moto_sagemaker.stopped[-1] == other
        assert sagemaker_state().training_jobs[other].training_job_status == "Stopped"
    assert len(moto_sagemaker.stopped) == 3


def test_a_failing_status_call_leaves_the_job_running(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    """An ordinary error while polling is the retried task's to recover from: the job is not stopped."""
    name = job_name("train", uuid.uuid4().hex)
    moto_sagemaker.scripts[name] = [dict(RUNNING[0]) for _ in range(10)]

    def drop(line: str) -> None:
        raise ConnectionError("connection reset")

    with pytest.raises(ConnectionError):
        SageMakerTrainingBackend(settings, options).train(spec(settings, name), on_log=drop)
    assert moto_sagemaker.stopped == []


def put_log_lines(logs: Any, group: str, stream: str, lines: list[str]) -> None:
    """What a job's container would have logged to CloudWatch (moto's jobs log nothing)."""
    if not logs.describe_log_groups(logGroupNamePrefix=group)["logGroups"]:
        logs.create_log_group(logGroupName=group)
    if not logs.describe_log_streams(logGroupName=group, logStreamNamePrefix=stream)["logStreams"]:
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
    start = int(time.time() * 1000)
    logs.put_log_events(
        logGroupName=group,
        logStreamName=stream,
        logEvents=[{"timestamp": start + i, "message": line} for i, line in enumerate(lines)],
    )


def test_failed_job_raises_with_its_reason_and_log_tail(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    backend = SageMakerTrainingBackend(settings, options)
    name = job_name("train", uuid.uuid4().hex)
    put_log_lines(
        backend.logs_client,
        TRAINING_LOG_GROUP,
        f"{name}/algo-1-1700000000",
        ["epoch: 1 train_loss: 1.6", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"],
    )
    moto_sagemaker.fail_next["reason"] = "AlgorithmError: ExecuteUserScriptError: CUDA out of memory"
    with pytest.raises(TrainingJobFailed, match=r"(?s)ExecuteUserScriptError.*Tried to allocate 2\.00 GiB") as failure:
        backend.train(spec(settings, name))
    assert failure.value.job.status == "Failed"
    assert failure.value.job.log_tail[-2:] == [
        "epoch: 1 train_loss: 1.6",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    ]


# --- CloudWatch log lines while a job runs -----------------------------------------------------
def test_log_follower_passes_each_event_once_and_waits_for_group_and_streams(
    settings: Settings, options: SageMakerOptions
) -> None:
    logs = SageMakerTrainingBackend(settings, options).logs_client
    group, job = f"/aws/sagemaker/TrainingJobs-{uuid.uuid4().hex}", job_name("train", uuid.uuid4().hex)
    lines: list[str] = []
    follower = LogFollower(logs, group, job, lines.append)
    follower.poll()  # no group yet: nothing to read, nothing reported
    logs.create_log_group(logGroupName=group)
    follower.poll()  # a group, no stream of this job yet
    put_log_lines(logs, group, f"{job}x/algo-1-1", ["another job's line"])  # shares the prefix, not the job
    put_log_lines(logs, group, f"{job}/algo-1-1", ["starting", "epoch: 1 train_loss: 1.6"])
    follower.poll()
    follower.poll()  # nothing new: nothing twice
    assert lines == ["starting", "epoch: 1 train_loss: 1.6"]
    put_log_lines(logs, group, f"{job}/algo-1-1", ["epoch: 2 train_loss: 1.2"])
    put_log_lines(logs, group, f"{job}/algo-2-1", ["worker 2 up"])  # a second instance: lines say which one
    follower.poll()
    assert lines[2:] == ["[algo-1-1] epoch: 2 train_loss: 1.2", "[algo-2-1] worker 2 up"]
    assert list(follower.tail) == lines and follower.problem is None


def test_log_follower_reports_a_missing_permission_once(settings: Settings, options: SageMakerOptions) -> None:
    logs = SageMakerTrainingBackend(settings, options).logs_client
    reported: list[str] = []

    def refuse(**_: Any) -> None:  # what CloudWatch answers a caller without logs:DescribeLogStreams
        raise ClientError(
            {
                "Error": {
                    "Code": "AccessDeniedException",
                    "Message": "not authorized to perform: logs:DescribeLogStreams",
                }
            },
            "DescribeLogStreams",
        )

    logs.meta.events.register_first("before-call.logs.DescribeLogStreams", refuse)
    try:
        follower = LogFollower(logs, TRAINING_LOG_GROUP, job_name("train", uuid.uuid4().hex), reported.append)
        follower.poll()
        follower.poll()
    finally:
        logs.meta.events.unregister("before-call.logs.DescribeLogStreams", refuse)
    (line,) = reported
    assert (
        "not authorized to perform: logs:DescribeLogStreams" in line
        and "grant logs:DescribeLogStreams and logs:GetLogEvents" in line
    )


def test_training_logs_stream_to_the_task_log_while_the_job_runs(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    backend = SageMakerTrainingBackend(settings, options)
    completed = {"training_job_status": "Completed", "secondary_status": "Completed"}
    # The first describe is the one that finds the job exists; the wait sees the rest.
    name = start_running_job(
        backend, settings, moto_sagemaker, [RUNNING[0], RUNNING[0], RUNNING[2], RUNNING[3], RUNNING[3], completed]
    )
    batches = {  # what the container has logged by the time the job shows each secondary status
        "InProgress (Downloading)": ["Downloading input data", "channel train: 40 images"],
        "InProgress (Training)": ["epoch: 1 train_loss: 1.6 eval_acc: 0.3", "epoch: 2 train_loss: 1.2 eval_acc: 0.4"],
        "Completed (Completed)": ["Reporting training SUCCESS"],
    }
    received: list[str] = []

    def on_log(line: str) -> None:
        received.append(line)
        for status, batch in batches.items():
            if line == f"training job {name} is {status}":
                put_log_lines(backend.logs_client, TRAINING_LOG_GROUP, f"{name}/algo-1-1700000000", batch)

    backend.train(spec(settings, name), on_log=on_log)
    streamed = [line for line in received if not line.startswith("training job")]
    assert streamed == [line for batch in batches.values() for line in batch]  # in order, each exactly once
    assert received.index("Downloading input data") < received.index(f"training job {name} is InProgress (Training)")


# --- debugger rules: the Debugger service's verdicts (option sagemaker_debugger) ---------------------------
def rule_statuses(job: str, states: dict[str, tuple[str, str | None]]) -> list[dict[str, Any]]:
    """DescribeTrainingJob's DebugRuleEvaluationStatuses (moto reports none: its jobs run no rules)."""
    return [
        {
            "RuleConfigurationName": rule,
            "RuleEvaluationStatus": state,
            "RuleEvaluationJobArn": (
                f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:processing-job/{job[:30]}-{rule.lower()[:12]}"
            ),
            **({"StatusDetails": details} if details else {}),
        }
        for rule, (state, details) in sorted(states.items())
    ]


IN_PROGRESS: dict[str, tuple[str, str | None]] = dict.fromkeys(RULE_NAMES, ("InProgress", None))
VERDICTS: dict[str, tuple[str, str | None]] = {
    **dict.fromkeys(RULE_NAMES, ("NoIssuesFound", None)),
    "Overfit": (
        "IssuesFound",
        "RuleEvaluationConditionMet: Evaluation of the rule Overfit at step 120 resulted in the condition being met",
    ),
    "PoorWeightInitialization": (
        "Error",
        "InternalServerError: the rule's processing job failed: no tensors in collection weights",
    ),
}


def test_rule_results_wait_for_every_rule_and_report_errors_as_errors(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    backend = SageMakerTrainingBackend(settings, options.model_copy(update={"sagemaker_debugger": True}))
    name = job_name("retrain", uuid.uuid4().hex)
    job = backend.train(spec(settings, name, debugger=True))
    partly = {**IN_PROGRESS, "LossNotDecreasing": VERDICTS["LossNotDecreasing"]}
    moto_sagemaker.scripts[name] = [
        {"debug_rule_evaluation_statuses": rule_statuses(name, states)}
        for states in (IN_PROGRESS, IN_PROGRESS, partly, VERDICTS)
    ]
    events: list[str] = []
    sleeps: list[float] = []
    results = backend.rule_results(job, events.append, sleep=sleeps.append)
    assert sleeps == [0.01, 0.015, 0.0225]  # polled with backoff until no rule was InProgress
    assert [(r.rule, r.status) for r in results] == [
        ("loss_not_decreasing", "passed"),
        ("overfit", "fired"),
        ("overtraining", "passed"),
        ("poor_weight_initialization", "error"),
        ("vanishing_gradient", "passed"),
    ]
    assert (
        results[1].evidence.startswith("RuleEvaluationConditionMet") and "processing job failed" in results[3].evidence
    )
    assert (
        results[3].processing_job_arn == f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:processing-job/{name[:30]}-poorweightin"
    )
    # Each rule's status is logged when it changes, not at every poll.
    assert len(events) == 5 + 1 + 4 and events.count(f"debugger rule LossNotDecreasing of {name} is InProgress") == 1
    assert (
        f"debugger rule PoorWeightInitialization of {name} is Error: {VERDICTS['PoorWeightInitialization'][1]}"
        in events
    )


def test_rules_still_running_at_the_timeout_are_not_evaluated(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    backend = SageMakerTrainingBackend(
        settings, options.model_copy(update={"rules_timeout_s": 0.2, "sagemaker_debugger": True})
    )
    name = job_name("retrain", uuid.uuid4().hex)
    job = backend.train(spec(settings, name, debugger=True))
    moto_sagemaker.scripts[name] = [
        {"debug_rule_evaluation_statuses": rule_statuses(name, {**VERDICTS, "Overtraining": ("InProgress", None)})}
        for _ in range(100)
    ]
    now = [0.0]
    events: list[str] = []
    results = backend.rule_results(
        job, events.append, sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0]
    )
    assert now[0] == pytest.approx(0.2)
    overtraining = next(r for r in results if r.rule == "overtraining")
    assert (overtraining.status, overtraining.evidence) == ("not_evaluated", "still InProgress after 0 s")
    assert "Overtraining" in events[-1] and "BINCOUNT_SAGEMAKER_RULES_TIMEOUT_S" in events[-1]


def test_debugger_rules_task_publishes_sagemakers_verdicts(
    prefect_server: None, sagemaker_env: Settings, moto_sagemaker: MotoSageMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow
    from prefect.artifacts import Artifact

    from tasks.train import check_debugger_rules_task

    monkeypatch.setenv("BINCOUNT_SAGEMAKER_DEBUGGER", "true")
    name = job_name("retrain", uuid.uuid4().hex)
    job = SageMakerTrainingBackend(sagemaker_env).train(spec(sagemaker_env, name, debugger=True))
    moto_sagemaker.scripts[name] = [
        {"debug_rule_evaluation_statuses": rule_statuses(name, states)} for states in (IN_PROGRESS, VERDICTS)
    ]

    @flow
    def check_rules(settings: Settings, job: TrainingJob) -> list[dict[str, Any]]:
        return [result.to_dict() for result in check_debugger_rules_task(settings, job)]

    rows = check_rules(sagemaker_env, job)
    assert {row["rule"]: row["status"] for row in rows} == {
        "loss_not_decreasing": "passed",
        "overfit": "fired",
        "overtraining": "passed",
        "poor_weight_initialization": "error",
        "vanishing_gradient": "passed",
    }
    artifact = Artifact.get("debugger-rules")
    assert artifact is not None and artifact.description == f"Debugger rules on {name}: 1 fired, 1 could not run"
    lines = {line.split(" | ")[0].strip("| "): line for line in artifact.data.splitlines() if line.startswith("| ")}
    for row in rows:
        assert row["processing_job_arn"].endswith(name[:30] + "-" + row["rule"].replace("_", "")[:12])
        assert row["processing_job_arn"] in lines[row["rule"]], "each verdict names the processing job that gave it"
    assert "**FIRED**" in lines["overfit"] and "could not run" in lines["poor_weight_initialization"]


# --- through Prefect -------------------------------------------------------------------------
def test_retried_task_follows_its_job_and_a_failure_reaches_the_flow_run(
    prefect_server: None, sagemaker_env: Settings, moto_sagemaker: MotoSageMaker
) -> None:
    from prefect import flow, task
    from prefect.context import get_run_context

    attempts: list[int] = []

    @task(retries=1, retry_delay_seconds=0)
    def train(settings: Settings, job_spec: TrainingJobSpec) -> str:
        attempts.append(len(attempts) + 1)

        def sink(line: str) -> None:  # the first attempt loses its connection while the job runs
            if len(attempts) == 1 and "is InProgress" in line:
                raise ConnectionError("connection reset while polling")

        return get_training_backend(settings).train(job_spec, on_log=sink).status

    @flow
    def pipeline(settings: Settings, runs_a_while: bool) -> str:
        name = job_name("train", str(get_run_context().flow_run.id))
        if runs_a_while:
            moto_sagemaker.scripts[name] = [RUNNING[0], RUNNING[3], RUNNING[3], {"training_job_status": "Completed"}]
        return train(settings, spec(settings, name))

    assert pipeline(sagemaker_env, runs_a_while=True) == "Completed"
    assert attempts == [1, 2]
    assert len(moto_sagemaker.created) == 1 and moto_sagemaker.stopped == []

    moto_sagemaker.fail_next["reason"] = "ClientError: Data download failed: channel train is empty"
    state = pipeline(sagemaker_env, runs_a_while=False, return_state=True)
    assert state.is_failed() and "channel train is empty" in (state.message or "")
    with pytest.raises(TrainingJobFailed, match="channel train is empty"):
        state.result()
    assert len(moto_sagemaker.created) == 2  # one job per flow run
