"""Requests the SageMaker serving backend builds for canary and linear updates, read as SageMaker gets them.

SageMaker moves a canary's or linear step's traffic in whole instances of the new fleet, and takes a
``CanarySize`` of at most 50% and a ``LinearStepSize`` of 10-50% of the variant's instance count (botocore's
service model documents the rule on ``TrafficRoutingConfig``; it cannot check it, so these tests do, on
the captured requests, against the instance count of the endpoint config the update moves to).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sagemaker_moto import Captured, MotoSageMaker, prediction, queue_answers

from bincount.config import Settings
from bincount.contracts.serving import DeployError, RolloutStrategy
from bincount.sagemaker.guardrails import steps_fit, traffic_steps
from bincount.sagemaker.serving import SageMakerServingBackend
from bincount.sagemaker.session import SageMakerOptions


@pytest.fixture
def backend(settings: Settings, options: SageMakerOptions) -> SageMakerServingBackend:
    guarded = options.model_copy(
        update={"cloudwatch_endpoint_url": options.endpoint_url, "autoscaling_endpoint_url": options.endpoint_url}
    )
    return SageMakerServingBackend(settings, guarded)


def sagemaker_accepts(update: dict[str, Any], config: dict[str, Any]) -> None:
    """SageMaker's rule on a guarded update's step size, against the config it moves to (TrafficRoutingConfig)."""
    routing = update["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    (variant,) = config["ProductionVariants"]
    instances = variant["InitialInstanceCount"]
    assert config["EndpointConfigName"] == update["EndpointConfigName"]
    if routing["Type"] == "CANARY":
        size = routing["CanarySize"]
        assert size["Type"] == "INSTANCE_COUNT" and 1 <= size["Value"] <= instances / 2
    if routing["Type"] == "LINEAR":
        size = routing["LinearStepSize"]
        assert size["Type"] == "INSTANCE_COUNT" and instances / 10 <= size["Value"] <= instances / 2


def test_a_canary_on_one_instance_runs_ten_for_the_rollout_and_goes_back_to_one(
    backend: SageMakerServingBackend, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> None:
    sagemaker = Captured(backend.client)
    name = f"bincount-canary-{uuid.uuid4().hex[:8]}"
    queue_answers(prediction(2))
    backend.deploy(name, models[1], "g:1")  # one instance (deploy_instance_count)

    queue_answers(prediction(3))
    record = backend.deploy(name, models[2], "g:2", strategy=RolloutStrategy("canary", traffic_percent=10))
    (update,) = sagemaker("UpdateEndpoint")  # each request validated against botocore's service model
    configs = {config["EndpointConfigName"]: config for config in sagemaker("CreateEndpointConfig")}
    sagemaker_accepts(update, configs[update["EndpointConfigName"]])
    assert configs[update["EndpointConfigName"]]["ProductionVariants"][0]["InitialInstanceCount"] == 10
    assert update["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["CanarySize"] == {
        "Type": "INSTANCE_COUNT",
        "Value": 1,  # 1 of 10: the 10% asked for
    }
    assert sagemaker("UpdateEndpointWeightsAndCapacities") == [
        {
            "EndpointName": name,
            "DesiredWeightsAndCapacities": [{"VariantName": "AllTraffic", "DesiredInstanceCount": 1}],
        }
    ]
    assert [operation for operation, _ in sagemaker.requests if operation.startswith("Update")] == [
        "UpdateEndpoint",
        "UpdateEndpointWeightsAndCapacities",  # after the update: back to the endpoint's own count
    ]
    assert record.replicas == 1
    assert record.rollout and record.rollout.verdict == "completed"
    assert record.rollout.backend["traffic_steps"] == {
        "instances": 10,
        "batch": 1,
        "serving": 1,
        "share_percent": 10.0,
    }


def test_linear_steps_of_a_quarter_run_on_four_instances(
    backend: SageMakerServingBackend, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> None:
    sagemaker = Captured(backend.client)
    name = f"bincount-linear-{uuid.uuid4().hex[:8]}"
    queue_answers(prediction(2))
    backend.deploy(name, models[1], "g:1")
    queue_answers(prediction(3))
    strategy = RolloutStrategy("linear", traffic_percent=25, bake_seconds=120)
    backend.deploy(name, models[2], "g:2", strategy=strategy)
    (update,) = sagemaker("UpdateEndpoint")
    configs = {config["EndpointConfigName"]: config for config in sagemaker("CreateEndpointConfig")}
    sagemaker_accepts(update, configs[update["EndpointConfigName"]])
    policy = update["DeploymentConfig"]["BlueGreenUpdatePolicy"]
    assert policy["TrafficRoutingConfiguration"]["LinearStepSize"] == {"Type": "INSTANCE_COUNT", "Value": 1}
    assert policy["MaximumExecutionTimeoutInSeconds"] == 4 * 120 + 1800  # four steps of one instance, each baked


def test_a_canary_past_the_instance_limit_is_refused_naming_the_share_and_the_count(
    settings: Settings, options: SageMakerOptions, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> None:
    backend = SageMakerServingBackend(
        settings,
        options.model_copy(
            update={
                "cloudwatch_endpoint_url": options.endpoint_url,
                "autoscaling_endpoint_url": options.endpoint_url,
                "rollout_max_instances": 4,
            }
        ),
    )
    sagemaker = Captured(backend.client)
    name = f"bincount-refused-{uuid.uuid4().hex[:8]}"
    queue_answers(prediction(2))
    first = backend.deploy(name, models[1], "g:1")
    sent = len(sagemaker.requests)
    with pytest.raises(
        DeployError,
        match=r"a 10% canary needs 10 instances: .*1 of 10 take the canary's share.*serves with 1 and "
        r"rollout_max_instances allows 4\. Allow 10 \(BINCOUNT_SAGEMAKER_ROLLOUT_MAX_INSTANCES=10.*share of at least "
        r"25%, which fits in 4; the endpoint keeps serving its current model",
    ):
        backend.deploy(name, models[2], "g:2", strategy=RolloutStrategy("canary", traffic_percent=10))
    changed = [op for op, _ in sagemaker.requests[sent:] if not op.startswith(("Describe", "List"))]
    assert changed == []  # refused before any model, config or update
    assert backend.records.read(name).version == first.version


@pytest.mark.parametrize("kind", ["canary", "linear"])
def test_every_share_gets_steps_sagemaker_accepts(kind: str) -> None:
    for percent in range(1 if kind == "canary" else 10, 51):
        for serving in range(1, 13):
            steps = traffic_steps(RolloutStrategy(kind, traffic_percent=percent, bake_seconds=1), serving, 100)
            assert steps is not None and steps.instances >= serving and steps.serving == serving
            assert 1 <= steps.batch <= steps.instances / 2, (percent, serving, steps)
            assert kind == "canary" or steps.batch >= steps.instances / 10, (percent, serving, steps)
            assert steps.share_percent <= percent  # never more traffic on the new model than asked
            if steps.instances > max(serving, 2):  # the fewest instances that do
                assert not steps_fit(kind, percent, steps.instances - 1), (percent, serving, steps)
