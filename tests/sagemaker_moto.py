"""SageMaker on loopback for the tests: moto's API extended where it lacks behaviour, the requests
the SDK sends (validated by botocore against the real service model), and small builders."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Callable
from typing import Any

import pytest
from botocore.validate import validate_parameters

from bincount.config import Settings
from bincount.contracts.training import TrainingJobSpec

ACCOUNT, REGION = "123456789012", "us-east-1"
BUCKET = "bincount-sagemaker-tests"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/bincount-sagemaker"


def sagemaker_state() -> Any:
    from moto.sagemaker.models import sagemaker_backends

    return sagemaker_backends[ACCOUNT][REGION]


def cloudwatch_state() -> Any:
    from moto.cloudwatch.models import cloudwatch_backends

    return cloudwatch_backends[ACCOUNT][REGION]


def percentile(self: Any, stat: str) -> Any:
    """moto's statistics with CloudWatch's percentiles (``p99``: nearest rank over the period's values)."""
    if stat.startswith("p") and stat[1:].replace(".", "", 1).isdigit():
        values = sorted(self.metric_single_values_list)
        return values[max(0, math.ceil(float(stat[1:]) / 100 * len(values)) - 1)] if values else None
    return MOTO_STATISTIC(self, stat)


def _moto_statistic() -> Any:
    from moto.cloudwatch.models import Statistics

    return Statistics.get_statistics_for_type


MOTO_STATISTIC = _moto_statistic()


class MotoSageMaker:
    """Extends moto's SageMaker API for one test: scripted job statuses, failures, and the calls moto lacks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from moto.sagemaker.models import SageMakerModelBackend
        from moto.sagemaker.responses import SageMakerResponse

        self.created: list[str] = []  # training jobs moto was asked to create
        self.scripts: dict[str, list[dict[str, Any]]] = {}  # job -> states to show, one per describe
        self.billed: dict[str, dict[str, Any]] = {}  # job -> what SageMaker's DescribeTrainingJob adds once it ran
        self.fail_next: dict[str, str] = {}  # failure reason for the next job created
        self.trials: dict[str, list[dict[str, Any]]] = {}  # tuning job -> training job summaries
        self.stopped: list[str] = []
        self.fail_updates: str | None = None  # failure reason for the next updates, which SageMaker rolls back
        # How many describes each next CreateEndpoint / UpdateEndpoint stays Creating / Updating (moto's are at once).
        self.endpoint_delays: list[int] = []
        self.changing: dict[str, list[Any]] = {}  # endpoint -> [describes left, config it moves to]
        self.shadows: dict[str, list[dict[str, Any]]] = {}  # endpoint config -> its ShadowProductionVariants
        self.deployments: dict[str, dict[str, Any]] = {}  # endpoint -> its LastDeploymentConfig
        # What DescribeEndpoint shows, one per describe, after the endpoint's next UpdateEndpoint, as SageMaker
        # decides a guarded update's outcome (the last one stays on the endpoint): EndpointStatus, EndpointConfigName
        # ("old" / "new": the configs the update moves from and to) and FailureReason. Unscripted, an update
        # completes (or rolls back on an alarm left in ALARM by ``bake``).
        self.outcomes: dict[str, list[dict[str, Any]]] = {}
        self.updating: dict[str, dict[str, str]] = {}  # endpoint -> {"old": config, "new": config} while scripted
        # What the bake of a guarded update does to its alarms (called with their names, as the new model's
        # metrics would): an alarm left in ALARM makes SageMaker roll the update back.
        self.bake: Callable[[list[str]], None] | None = None
        self.moto = {name: getattr(SageMakerModelBackend, name) for name in self.BACKEND_CALLS}
        self.moto_responses = {name: getattr(SageMakerResponse, name) for name in self.WRAPPED_RESPONSES}
        for name in self.BACKEND_CALLS:  # moto's backend calls, wrapped (the backend comes first, as self)
            monkeypatch.setattr(SageMakerModelBackend, name, self._handler(getattr(self, name)))
        for name in self.RESPONSE_CALLS + self.WRAPPED_RESPONSES:  # the calls moto lacks or drops fields of
            monkeypatch.setattr(SageMakerResponse, name, self._handler(getattr(self, name)), raising=False)
        from moto.cloudwatch.models import Statistics

        monkeypatch.setattr(Statistics, "get_statistics_for_type", percentile)

    BACKEND_CALLS = ("create_training_job", "describe_training_job", "create_endpoint", "describe_endpoint")
    RESPONSE_CALLS = ("update_endpoint", "stop_training_job", "list_training_jobs_for_hyper_parameter_tuning_job")
    WRAPPED_RESPONSES = ("create_endpoint_config", "describe_endpoint_config")  # moto drops ShadowProductionVariants

    @staticmethod
    def _handler(method: Any) -> Any:
        return lambda receiver, *args, **kwargs: method(receiver, *args, **kwargs)

    def create_training_job(self, backend: Any, training_job_name: str, **kwargs: Any) -> Any:
        self.created.append(training_job_name)
        job = self.moto["create_training_job"](backend, training_job_name=training_job_name, **kwargs)
        if self.fail_next:  # moto completes every job; a real one can fail
            job.training_job_status, job.secondary_status = "Failed", "Failed"
            job.failure_reason = self.fail_next.pop("reason")
        return job

    def describe_training_job(self, backend: Any, training_job_name: str) -> Any:
        script = self.scripts.get(training_job_name)
        if script and training_job_name in backend.training_jobs:  # the next scripted state (moto's jobs never run)
            job = backend.training_jobs[training_job_name]
            for key, value in script.pop(0).items():
                setattr(job, key, value)
        return {
            **self.moto["describe_training_job"](backend, training_job_name),
            **self.billed.get(training_job_name, {}),
        }

    def create_endpoint(self, backend: Any, endpoint_name: str, **kwargs: Any) -> Any:
        endpoint = self.moto["create_endpoint"](backend, endpoint_name=endpoint_name, **kwargs)
        if self.endpoint_delays:
            endpoint.endpoint_status = "Creating"
            self.changing[endpoint_name] = [self.endpoint_delays.pop(0), endpoint.endpoint_config_name]
        return endpoint

    def describe_endpoint(self, backend: Any, endpoint_name: str) -> Any:
        configs = self.updating.get(endpoint_name)
        if configs and endpoint_name in backend.endpoints:  # the next scripted outcome of the update
            states = self.outcomes[endpoint_name]
            state = states.pop(0)
            endpoint = backend.endpoints[endpoint_name]
            endpoint.endpoint_status = state["EndpointStatus"]
            config = state.get("EndpointConfigName", "new")
            endpoint.endpoint_config_name = configs.get(config, config)
            endpoint.failure_reason = state.get("FailureReason")
            if not states:  # the outcome is final: later describes (and updates) are moto's again
                del self.updating[endpoint_name], self.outcomes[endpoint_name]
        change = self.changing.get(endpoint_name)
        if change and endpoint_name in backend.endpoints:
            if change[0] > 0:
                change[0] -= 1
            else:  # the change is done
                endpoint = backend.endpoints[endpoint_name]
                endpoint.endpoint_status, endpoint.endpoint_config_name = "InService", change[1]
                del self.changing[endpoint_name]
        answer = self.moto["describe_endpoint"](backend, endpoint_name)
        shadows = self.shadows.get(answer["EndpointConfigName"])
        if shadows:
            answer["ShadowProductionVariants"] = [
                {"VariantName": v["VariantName"], "CurrentWeight": v["InitialVariantWeight"]} for v in shadows
            ]
        if endpoint_name in self.deployments:
            answer["LastDeploymentConfig"] = self.deployments[endpoint_name]
        return answer

    def create_endpoint_config(self, response: Any) -> Any:
        from moto.sagemaker.exceptions import ValidationError

        shadows = response._get_param("ShadowProductionVariants") or []
        for variant in shadows:  # as moto checks the production variants' models
            if variant["ModelName"] not in response.sagemaker_backend._models:
                raise ValidationError(message=f"Could not find model '{variant['ModelName']}'.")
        result = self.moto_responses["create_endpoint_config"](response)
        if shadows:
            self.shadows[response._get_param("EndpointConfigName")] = shadows
        return result

    def describe_endpoint_config(self, response: Any) -> Any:
        from moto.core.responses import ActionResult

        name = response._get_param("EndpointConfigName")
        answer = dict(response.sagemaker_backend.describe_endpoint_config(name))
        if name in self.shadows:
            answer["ShadowProductionVariants"] = self.shadows[name]
        return ActionResult(answer)

    def update_endpoint(self, response: Any) -> Any:  # moto 5.2 has no UpdateEndpoint
        from moto.core.responses import ActionResult
        from moto.sagemaker.exceptions import ValidationError

        endpoint = response.sagemaker_backend.endpoints[response._get_param("EndpointName")]
        if endpoint.endpoint_status in ("Creating", "Updating"):  # as SageMaker refuses it
            raise ValidationError(message=f'Cannot update in-progress endpoint "{endpoint.arn}".')
        config = response._get_param("EndpointConfigName")
        deployment = response._get_param("DeploymentConfig")
        if deployment:
            self.deployments[endpoint.endpoint_name] = deployment
            alarms = [alarm["AlarmName"] for alarm in deployment.get("AutoRollbackConfiguration", {}).get("Alarms", [])]
            if self.bake:
                self.bake(alarms)
        if endpoint.endpoint_name in self.outcomes:  # SageMaker decides, as the outcomes say
            self.updating[endpoint.endpoint_name] = {"old": endpoint.endpoint_config_name, "new": config}
            endpoint.endpoint_status, endpoint.failure_reason = "Updating", None
            return ActionResult({"EndpointArn": endpoint.arn})
        if deployment and any(cloudwatch_state().alarms[name].state_value == "ALARM" for name in alarms):
            config = endpoint.endpoint_config_name  # rolled back: the old fleet keeps all traffic
        if self.fail_updates:  # SageMaker keeps the old config serving and says why
            endpoint.failure_reason = self.fail_updates
        elif self.endpoint_delays:  # the old config serves until the new fleet is up
            endpoint.endpoint_status, endpoint.failure_reason = "Updating", None
            self.changing[endpoint.endpoint_name] = [self.endpoint_delays.pop(0), config]
            return ActionResult({"EndpointArn": endpoint.arn})
        else:
            endpoint.endpoint_config_name = config
            endpoint.failure_reason = None
        endpoint.endpoint_status = "InService"
        return ActionResult({"EndpointArn": endpoint.arn})

    def stop_training_job(self, response: Any) -> Any:  # nor StopTrainingJob
        from moto.core.responses import EmptyResult

        name = response._get_param("TrainingJobName")
        self.stopped.append(name)
        job = response.sagemaker_backend.training_jobs[name]
        job.training_job_status, job.secondary_status = "Stopped", "Stopped"
        self.scripts.pop(name, None)
        return EmptyResult()

    def list_training_jobs_for_hyper_parameter_tuning_job(self, response: Any) -> Any:  # nor this
        from moto.core.responses import ActionResult

        return ActionResult(
            {"TrainingJobSummaries": self.trials.get(response._get_param("HyperParameterTuningJobName"), [])}
        )


class Captured:
    """Every request sent through a client (SageMaker's, CloudWatch's, ...), as botocore is about to serialize it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.requests: list[tuple[str, dict[str, Any]]] = []
        service = client.meta.service_model.service_id.hyphenize()  # sagemaker, cloudwatch, application-auto-scaling
        client.meta.events.register(f"provide-client-params.{service}.*", self._record)

    def _record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.requests.append((model.name, json.loads(json.dumps(params, default=str))))

    def __call__(self, operation: str) -> list[dict[str, Any]]:
        """The requests of ``operation``, each validated against the real service model first."""
        found = [params for name, params in self.requests if name == operation]
        shape = self.client.meta.service_model.operation_model(operation).input_shape
        for params in found:
            validate_parameters(params, shape)  # raises ParamValidationError listing every problem
        return found


def decoded(hyperparameters: dict[str, str]) -> dict[str, Any]:
    """The SDK JSON-encodes framework hyperparameters; SageMaker's training toolkit decodes them."""
    return {name: json.loads(value) for name, value in hyperparameters.items()}


def spec(settings: Settings, name: str, **kwargs: Any) -> TrainingJobSpec:
    channels = {
        split: settings.artifact_uri("datasets", "demo", "channels", split) for split in ("train", "valid", "test")
    }
    return TrainingJobSpec(
        name=name,
        hyperparameters={"lr": 0.05, "batch-size": 64, "epochs": 3, "arch": "resnet50"},
        channels=channels,
        output_uri=settings.artifact_uri("jobs"),
        **kwargs,
    )


def model_archive(seed: int, image_size: int = 64, classes: tuple[int, ...] = (1, 2, 3, 4, 5)) -> bytes:
    """A model.tar.gz as train.py packs it (the weights only need to be distinct bytes here)."""
    info = {
        "arch": "resnet18",
        "classes": list(classes),
        "image_size": image_size,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "hyperparameters": {},
        "metrics": {},
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("model.pt", f"weights {seed}".encode()), ("model_info.json", json.dumps(info).encode())):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def prediction(count: int) -> str:
    probabilities = {str(c): (0.96 if c == count else 0.01) for c in range(1, 6)}
    return json.dumps({"predictions": [{"predicted_count": count, "probabilities": probabilities}]})


def queue_answers(*bodies: str) -> None:
    """What moto's sagemaker-runtime answers next (its default answer, b"body", is no prediction)."""
    from moto.sagemakerruntime.models import sagemakerruntime_backends

    runtime = sagemakerruntime_backends[ACCOUNT][REGION]
    runtime.results.clear()  # moto repeats an endpoint's earlier answer to the same body otherwise
    runtime.results_queue[:] = [(body, "application/json", "AllTraffic", "") for body in bodies]
