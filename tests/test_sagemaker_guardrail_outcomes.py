"""The project's reaction to each outcome SageMaker documents for a guarded blue/green update (DescribeEndpoint's
EndpointStatus, API reference): the update rolled back by its alarm (InService on the old config, with a
FailureReason), the endpoint Failed (only DeleteEndpoint is allowed on it), SageMaker's own rollback failed
(UpdateRollbackFailed: in service on a mix of both configs), and the update stopped with the endpoint OutOfService.

SageMaker's answers are scripted (``MotoSageMaker.outcomes``: what DescribeEndpoint shows after the update, one per
describe), so what these tests check is the project's handling of them: what it records, the artifact text it
publishes, the exception it raises, and the requests it sends afterwards (each one strictly checked).
"""

from __future__ import annotations

import uuid

import pytest
from sagemaker_moto import Captured, MotoSageMaker, cloudwatch_state, prediction, queue_answers

from bincount.config import Settings
from bincount.contracts.serving import DeployError, EndpointRecord, RolloutStrategy
from bincount.sagemaker.serving import SageMakerServingBackend
from bincount.sagemaker.session import SageMakerOptions
from tasks.deploy import rollout_markdown

CANARY = RolloutStrategy("canary", traffic_percent=10, bake_seconds=300)


@pytest.fixture
def backend(settings: Settings, options: SageMakerOptions) -> SageMakerServingBackend:
    guarded = options.model_copy(
        update={
            "cloudwatch_endpoint_url": options.endpoint_url,
            "autoscaling_endpoint_url": options.endpoint_url,
            "endpoint_timeout_s": 60,  # a scripted outcome that never came would fail the test, not hang it
        }
    )
    return SageMakerServingBackend(settings, guarded)


@pytest.fixture
def serving(backend: SageMakerServingBackend, models: dict[int, str]) -> tuple[str, EndpointRecord]:
    """An endpoint serving model 1 (``g:1``) on one instance: the guarded update moves it to model 2."""
    name = f"bincount-outcome-{uuid.uuid4().hex[:8]}"
    queue_answers(prediction(2))
    return name, backend.deploy(name, models[1], "g:1")


def changes(sagemaker: Captured, since: int) -> list[str]:
    """The requests after ``since`` that change something (describes and lists left out)."""
    return [op for op, _ in sagemaker.requests[since:] if not op.startswith(("Describe", "List"))]


def failed_canary(
    backend: SageMakerServingBackend, models: dict[int, str], moto_sagemaker: MotoSageMaker, name: str, ends: dict
) -> str:
    """Deploy model 2 to ``name`` as a canary whose update SageMaker ends as ``ends`` says (DescribeEndpoint's
    answer after "Updating"); return the DeployError's message."""
    moto_sagemaker.outcomes[name] = [{"EndpointStatus": "Updating"}, ends]
    with pytest.raises(DeployError) as failed:
        backend.deploy(name, models[2], "g:2", strategy=CANARY)
    return str(failed.value)


def test_rolled_back_by_its_alarm_records_the_old_model_and_why(
    backend: SageMakerServingBackend,
    models: dict[int, str],
    moto_sagemaker: MotoSageMaker,
    serving: tuple[str, EndpointRecord],
) -> None:
    name, first = serving
    sagemaker = Captured(backend.client)
    reason = f"Endpoint update was rolled back because the alarm {name}-bincount-5xx went into ALARM state."
    moto_sagemaker.outcomes[name] = [
        {"EndpointStatus": "Updating"},
        {"EndpointStatus": "Updating"},
        {"EndpointStatus": "InService", "EndpointConfigName": "old", "FailureReason": reason},
    ]
    moto_sagemaker.bake = lambda alarms: cloudwatch_state().set_alarm_state(
        alarms[0], "Threshold Crossed: 1 datapoint [0.2] > 0.02", "{}", "ALARM"
    )
    record = backend.deploy(name, models[2], "g:2", strategy=CANARY)

    assert (record.version, record.model_ref) == (first.version, "g:1")  # the old model serves: recorded so
    assert record.details["endpoint_config"] == first.details["endpoint_config"]
    assert backend.records.read(name) == record
    assert record.rollout is not None and record.rollout.verdict == "rolled-back"
    assert f"alarm {name}-bincount-5xx (ALARM: Threshold Crossed" in record.rollout.reason
    assert f"SageMaker: {reason}" in record.rollout.reason
    update = sagemaker("UpdateEndpoint")[0]
    assert record.rollout.backend["deployment_config"] == update["DeploymentConfig"]  # LastDeploymentConfig
    assert f"canary 10%, bake 300 s: **rolled-back**\n\n{record.rollout.reason}" in rollout_markdown(record.rollout)
    # SageMaker put the old fleet back itself, on its own instance count: nothing more to send.
    assert changes(sagemaker, 0)[-1] == "UpdateEndpoint" and len(sagemaker("UpdateEndpoint")) == 1


def test_a_failed_endpoint_is_not_updated_and_the_error_says_only_a_delete_helps(
    backend: SageMakerServingBackend,
    models: dict[int, str],
    moto_sagemaker: MotoSageMaker,
    serving: tuple[str, EndpointRecord],
) -> None:
    name, first = serving
    sagemaker = Captured(backend.client)
    message = failed_canary(
        backend,
        models,
        moto_sagemaker,
        name,
        {"EndpointStatus": "Failed", "FailureReason": "Unable to provision requested ML compute capacity."},
    )
    assert f"failed on endpoint {name!r}: it is Failed on config " in message
    assert "Unable to provision requested ML compute capacity." in message
    assert "SageMaker allows nothing but deleting a Failed endpoint, and it serves no model now" in message
    assert f"`BINCOUNT_PROFILE=aws bincount delete-endpoint {name}`" in message
    assert "update-endpoint" not in message  # SageMaker refuses every update of a Failed endpoint
    assert sagemaker("UpdateEndpoint")[1:] == []  # and the project sends none
    assert "UpdateEndpointWeightsAndCapacities" not in changes(sagemaker, 0)
    assert backend.records.read(name) == first  # nothing recorded as serving that does not


def test_a_failed_automatic_rollback_is_settled_by_updating_back_to_the_old_config(
    backend: SageMakerServingBackend,
    models: dict[int, str],
    moto_sagemaker: MotoSageMaker,
    serving: tuple[str, EndpointRecord],
) -> None:
    name, first = serving
    sagemaker = Captured(backend.client)
    message = failed_canary(
        backend,
        models,
        moto_sagemaker,
        name,
        {"EndpointStatus": "UpdateRollbackFailed", "FailureReason": "Rollback failed: the old fleet did not start."},
    )
    assert "it is UpdateRollbackFailed on config " in message and "the old fleet did not start" in message
    old_config = first.details["endpoint_config"]
    assert (
        f"Rolled back: endpoint {name!r} serves its previous config {old_config} (model version {first.version})"
        in message
    )
    guarded, back = sagemaker("UpdateEndpoint")  # the mix of both configs settled on the old one
    assert "DeploymentConfig" in guarded and back == {"EndpointName": name, "EndpointConfigName": old_config}
    assert backend.client.describe_endpoint(EndpointName=name)["EndpointConfigName"] == old_config
    assert backend.records.read(name) == first


def test_an_update_stopped_out_of_service_is_reported_with_what_to_run(
    backend: SageMakerServingBackend,
    models: dict[int, str],
    moto_sagemaker: MotoSageMaker,
    serving: tuple[str, EndpointRecord],
) -> None:
    name, first = serving
    sagemaker = Captured(backend.client)
    message = failed_canary(
        backend,
        models,
        moto_sagemaker,
        name,
        {"EndpointStatus": "OutOfService", "FailureReason": "The deployment was stopped."},
    )
    old_config = first.details["endpoint_config"]
    assert (
        f"Rolling back to config {old_config} failed too (it is OutOfService: The deployment was stopped.)" in message
    )
    assert f"--endpoint-config-name {old_config}` once the endpoint is InService" in message
    assert f"bincount delete-endpoint {name}" in message
    assert len(sagemaker("UpdateEndpoint")) == 1  # no update is sent to an endpoint out of service
    assert backend.records.read(name) == first
