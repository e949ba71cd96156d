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
from dataclasses import dataclass
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
from bincount.contracts.serving import BatchTransformSummary, DeployError, EndpointNotFoundError, EndpointRecord
from bincount.contracts.training import DEBUGGER_RULES, TrainingJob, TrainingJobFailed, TrainingJobSpec
from bincount.contracts.tuning import SEEDS_SEARCH_SPACE, TuningResult, TuningSpec
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


@dataclass(frozen=True)
class Tuned:
    """A tuning job run through the backend, with the requests it sent."""

    backend: SageMakerTuningBackend
    captured: Captured
    spec: TuningSpec
    result: TuningResult
    best_trial: str


@pytest.fixture
def tuned(settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker) -> Tuned:
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
    return Tuned(backend, captured, tuning, result, best_trial)


def test_the_aws_profile_tunes_on_sagemaker(settings: Settings) -> None:
    assert isinstance(get_tuning_backend(settings), SageMakerTuningBackend)


def test_tuning_job_request_searches_the_space_around_the_static_hyperparameters(tuned: Tuned) -> None:
    (request,) = tuned.captured("CreateHyperParameterTuningJob")
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


def test_tuning_reads_back_the_best_trial_its_hyperparameters_and_every_trial(settings: Settings, tuned: Tuned) -> None:
    result, best_trial = tuned.result, tuned.best_trial
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


def test_tuning_cost_bills_every_trial_at_its_instance_types_rate(tuned: Tuned) -> None:
    result = tuned.result
    # Both trials' billed seconds at the price table's rate for their instance type.
    hourly = price_table()["per_instance_hour"]["ml.g5.xlarge"]
    assert result.cost is not None and (result.cost.billed_s, result.cost.jobs) == (1500, 2)
    assert result.cost.usd == pytest.approx(1500 / 3600 * hourly, abs=1e-3)
    assert result.cost.summary() == f"${result.cost.usd:.2f} (1 x ml.g5.xlarge, 1500 instance-s billed over 2 jobs)"


def test_a_retried_tune_follows_its_tuning_job_instead_of_starting_another(tuned: Tuned) -> None:
    tuned.backend.tune(tuned.spec)
    assert len(tuned.captured("CreateHyperParameterTuningJob")) == 1


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
@dataclass(frozen=True)
class Serving:
    """An endpoint deployed through the factory's backend, with the requests it sent."""

    backend: SageMakerServingBackend
    captured: Captured
    name: str
    first: EndpointRecord


@pytest.fixture
def serving(sagemaker_env: Settings, models: dict[int, str], moto_sagemaker: MotoSageMaker) -> Serving:
    """A new endpoint serving ``models[1]``."""
    backend = get_serving_backend(sagemaker_env)
    assert isinstance(backend, SageMakerServingBackend)
    captured = Captured(backend.client)
    name = f"bincount-test-{uuid.uuid4().hex[:8]}"
    queue_answers(prediction(2))
    return Serving(backend, captured, name, backend.deploy(name, models[1]))


@pytest.fixture
def updated(serving: Serving, models: dict[int, str]) -> EndpointRecord:
    """The endpoint updated to serve ``models[2]``."""
    queue_answers(prediction(3))
    return serving.backend.deploy(serving.name, models[2])


def rolled_back_message(name: str, serving_now: EndpointRecord) -> str:
    """The pattern of a DeployError's rollback line, for an endpoint back on ``serving_now``."""
    return (
        f"Rolled back: endpoint '{name}' serves its previous config {serving_now.details['endpoint_config']} "
        f"\\(model version {serving_now.version}\\) again"
    )


def impatient_backend(serving: Serving) -> SageMakerServingBackend:
    """The backend with an endpoint_timeout_s no update outlives."""
    backend = serving.backend
    return SageMakerServingBackend(
        backend.settings, backend.options.model_copy(update={"endpoint_timeout_s": 1e-6}), session=backend.session
    )


def test_a_first_deploy_creates_the_model_its_config_and_the_endpoint(serving: Serving) -> None:
    backend, captured, name, first = serving.backend, serving.captured, serving.name, serving.first
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


def test_a_second_deploy_updates_the_endpoint_to_a_new_config(serving: Serving, updated: EndpointRecord) -> None:
    (update,) = serving.captured("UpdateEndpoint")
    assert update["EndpointName"] == serving.name and update["EndpointConfigName"] == updated.details["endpoint_config"]
    assert updated.previous_version == serving.first.version
    assert updated.details["previous_endpoint_config"] == serving.first.details["endpoint_config"]


def test_a_new_model_that_answers_nonsense_is_rolled_back(
    serving: Serving, updated: EndpointRecord, models: dict[int, str]
) -> None:
    backend, captured, name = serving.backend, serving.captured, serving.name
    queue_answers("not a prediction")  # the new model answers nonsense: the deploy rolls back
    with pytest.raises(
        DeployError, match=f"answer.*{rolled_back_message(name, updated)}.*fix the model, then deploy again"
    ):
        backend.deploy(name, models[3])
    updates = [u["EndpointConfigName"] for u in captured("UpdateEndpoint")]
    assert len(updates) == 3 and updates[0] == updates[2] == updated.details["endpoint_config"] != updates[1]
    assert sagemaker_state().endpoints[name].endpoint_config_name == updated.details["endpoint_config"]
    assert backend.describe(name).version == updated.version


def test_an_update_sagemaker_fails_is_reported_and_not_updated_again(
    serving: Serving, updated: EndpointRecord, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> None:
    # SageMaker rolls a failed update back by itself.
    moto_sagemaker.fail_updates = "ClientError: the container did not pass the ping health check"
    with pytest.raises(
        DeployError, match=f"did not pass the ping health check.*{rolled_back_message(serving.name, updated)}"
    ):
        serving.backend.deploy(serving.name, models[3])
    assert len(serving.captured("UpdateEndpoint")) == 2
    assert sagemaker_state().endpoints[serving.name].endpoint_config_name == updated.details["endpoint_config"]


def test_an_update_past_the_timeout_is_rolled_back_once_sagemaker_lets_it(
    serving: Serving, updated: EndpointRecord, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> None:
    # SageMaker takes no update while one runs: here the new fleet comes up just after the timeout.
    moto_sagemaker.endpoint_delays = [1]
    with pytest.raises(DeployError, match=f"still Updating after 0 s. {rolled_back_message(serving.name, updated)}"):
        impatient_backend(serving).deploy(serving.name, models[3])
    new_config = serving.captured("CreateEndpointConfig")[-1]["EndpointConfigName"]
    updates = [u["EndpointConfigName"] for u in serving.captured("UpdateEndpoint")]
    assert len(updates) == 3 and updates[1] == new_config and updates[2] == updated.details["endpoint_config"]
    assert sagemaker_state().endpoints[serving.name].endpoint_config_name == updated.details["endpoint_config"]
    assert serving.backend.describe(serving.name).version == updated.version


def test_a_retried_deploy_of_what_already_serves_creates_nothing(
    serving: Serving, updated: EndpointRecord, models: dict[int, str]
) -> None:
    captured = serving.captured
    before = {
        op: len(captured(op)) for op in ("CreateModel", "CreateEndpointConfig", "CreateEndpoint", "UpdateEndpoint")
    }
    queue_answers(prediction(3))
    again = serving.backend.deploy(serving.name, models[2])
    assert {op: len(captured(op)) for op in before} == before
    assert again.details["endpoint_config"] == updated.details["endpoint_config"]


def test_an_update_outliving_the_rollbacks_wait_says_what_to_run_and_the_next_deploy_waits_for_it(
    serving: Serving, updated: EndpointRecord, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> None:
    name, serving_config = serving.name, updated.details["endpoint_config"]
    moto_sagemaker.endpoint_delays = [5]
    with pytest.raises(
        DeployError,
        match=(
            f"Rolling back to config {serving_config} failed too .*still Updating.*"
            f"aws sagemaker update-endpoint --endpoint-name {name} --endpoint-config-name {serving_config}"
        ),
    ):
        impatient_backend(serving).deploy(name, models[3])
    new_config = serving.captured("CreateEndpointConfig")[-1]["EndpointConfigName"]
    # The next deploy waits for the running update to finish before it updates the endpoint.
    queue_answers(prediction(3))
    assert serving.backend.deploy(name, models[2]).details["previous_endpoint_config"] == new_config
    assert sagemaker_state().endpoints[name].endpoint_config_name == serving_config


def test_delete_removes_the_endpoint_and_then_reports_it_missing(serving: Serving) -> None:
    backend, name = serving.backend, serving.name
    backend.delete(name)
    assert name not in sagemaker_state().endpoints
    assert serving.captured("DeleteEndpoint") == [{"EndpointName": name}]
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


@dataclass(frozen=True)
class Transformed:
    """A batch transform of six images (two per count) through the backend, and what it sent, logged and wrote."""

    backend: SageMakerServingBackend
    captured: Captured
    prefix: str
    images: dict[str, int]  # key under in/ -> label
    summary: BatchTransformSummary
    progress: list[tuple[int, int]]
    streamed: list[str]  # the container's log lines, as the task log shows them


# What the transform container logs (a stream per instance, and one for the data plane).
CONTAINER_LINES = {
    "i-0abc1234": ["Warming up the model", "Model loaded"],
    "i-0abc1234/data-log": ["6 requests, 0 errors"],
}


@pytest.fixture
def transformed(
    settings: Settings,
    options: SageMakerOptions,
    models: dict[int, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> Transformed:
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

    def container_logs(**_: Any) -> None:
        job = captured("CreateTransformJob")[-1]["TransformJobName"]
        for host, lines in CONTAINER_LINES.items():
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
    return Transformed(backend, captured, prefix, images, summary, progress, streamed)


def test_batch_transform_streams_the_containers_logs_to_the_task_log(transformed: Transformed) -> None:
    assert transformed.streamed == [f"[{host}] {line}" for host, lines in CONTAINER_LINES.items() for line in lines]


def test_batch_transform_request_sends_each_image_as_one_record(transformed: Transformed) -> None:
    prefix = transformed.prefix
    (request,) = transformed.captured("CreateTransformJob")
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


def test_batch_transform_summary_scores_every_image_and_reports_progress(transformed: Transformed) -> None:
    summary = transformed.summary
    assert (summary.images, summary.scored, summary.failed) == (6, 6, 0)
    assert summary.accuracy == pytest.approx(2 / 6, abs=1e-4)
    assert transformed.progress == [(0, 6), (6, 6)]


def test_batch_transform_writes_the_answers_joined_with_the_labels(transformed: Transformed) -> None:
    import pandas as pd

    s3 = transformed.backend.session.boto_session.client("s3")
    key = f"{transformed.prefix}/out/results.csv"
    table = pd.read_csv(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()))
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
    images = transformed.images
    assert set(table["model_version"].astype(str)) == {transformed.summary.model_version}
    assert sorted(table["key"]) == sorted(images) and set(table["predicted_count"]) == {2}
    assert dict(zip(table["key"], table["label"], strict=True)) == images


def test_a_retried_batch_transform_follows_the_job_it_started(transformed: Transformed, models: dict[int, str]) -> None:
    prefix = transformed.prefix
    transformed.backend.batch_transform(models[1], f"s3://{BUCKET}/{prefix}/in", f"s3://{BUCKET}/{prefix}/out")
    assert len(transformed.captured("CreateTransformJob")) == 1


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
