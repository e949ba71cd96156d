"""Serverless SageMaker endpoints: the endpoint config carries a ServerlessConfig instead of instances (read from the
requests as SageMaker gets them, each one strictly checked), and what serverless cannot do is refused before any
request changes anything."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sagemaker_moto import Captured, MotoSageMaker, prediction, queue_answers

from bincount.config import Settings, SettingsError
from bincount.contracts.serving import CaptureConfig, RolloutStrategy, ScalingConfig
from bincount.sagemaker.costs import endpoint_cost
from bincount.sagemaker.serving import SageMakerServingBackend
from bincount.sagemaker.session import SageMakerOptions


@pytest.fixture
def serverless(settings: Settings, options: SageMakerOptions) -> SageMakerServingBackend:
    chosen = options.model_copy(
        update={
            "serverless_memory_mb": 2048,
            "serverless_max_concurrency": 8,
            "cloudwatch_endpoint_url": options.endpoint_url,
            "autoscaling_endpoint_url": options.endpoint_url,
        }
    )
    return SageMakerServingBackend(settings, chosen)


def test_a_serverless_endpoint_config_names_memory_and_concurrency_not_instances(
    serverless: SageMakerServingBackend, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> None:
    sagemaker = Captured(serverless.client)
    name = f"bincount-serverless-{uuid.uuid4().hex[:8]}"
    queue_answers(prediction(2))
    first = serverless.deploy(name, models[1], "g:1")
    queue_answers(prediction(3))
    second = serverless.deploy(name, models[2], "g:2")  # a plain update: SageMaker's blue/green, smoke-checked

    configs = sagemaker("CreateEndpointConfig")  # validated against botocore's service model
    assert len(configs) == 2
    for config in configs:
        (variant,) = config["ProductionVariants"]
        assert variant["ServerlessConfig"] == {"MemorySizeInMB": 2048, "MaxConcurrency": 8}
        assert "InstanceType" not in variant and "InitialInstanceCount" not in variant
        assert "DataCaptureConfig" not in config and "ShadowProductionVariants" not in config
    (update,) = sagemaker("UpdateEndpoint")
    assert "DeploymentConfig" not in update and update["EndpointConfigName"] == configs[1]["EndpointConfigName"]
    assert first.details["serverless"] == second.details["serverless"] == {"MemorySizeInMB": 2048, "MaxConcurrency": 8}
    assert second.version != first.version and second.rollout is not None and second.rollout.verdict == "completed"
    cost = endpoint_cost(second, dt.datetime.fromisoformat(second.deployed_at) + dt.timedelta(hours=2))
    assert cost is not None and cost.usd is None and cost.summary().startswith("serverless since ")

    # The same model on instances is another endpoint config (the name hashes the serverless settings too).
    instances = SageMakerServingBackend(
        serverless.settings, serverless.options.model_copy(update={"serverless_memory_mb": None})
    )
    on_instances = Captured(instances.client)
    queue_answers(prediction(3))
    instances.deploy(name, models[2], "g:2")
    (config,) = on_instances("CreateEndpointConfig")
    (variant,) = config["ProductionVariants"]
    assert "ServerlessConfig" not in variant and variant["InitialInstanceCount"] == 1


@pytest.mark.parametrize(
    ("ask", "refusal"),
    [
        (
            {"capture": CaptureConfig(sampling_percentage=20)},
            r"data capture \(sampling_percentage 20\) on a serverless",
        ),
        ({"strategy": RolloutStrategy("shadow", traffic_percent=10)}, r"strategy 'shadow' .* no shadow variant"),
        ({"strategy": RolloutStrategy("canary", traffic_percent=10)}, r"strategy 'canary' .* deployment guardrails"),
        ({"strategy": RolloutStrategy()}, r"strategy 'all-at-once' .* Deploy without a strategy"),
        ({"scaling": ScalingConfig(min_replicas=1, max_replicas=4)}, r"autoscaling \(min_replicas 1, max_replicas 4\)"),
    ],
)
def test_what_serverless_cannot_do_is_refused_before_anything_changes(
    serverless: SageMakerServingBackend,
    models: dict[int, str],
    moto_sagemaker: MotoSageMaker,
    ask: dict,
    refusal: str,
) -> None:
    sagemaker = Captured(serverless.client)
    name = f"bincount-refused-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ValueError, match=refusal + r".*unset BINCOUNT_SAGEMAKER_SERVERLESS_MEMORY_MB"):
        serverless.deploy(name, models[1], "g:1", **ask)
    assert [op for op, _ in sagemaker.requests if not op.startswith(("Describe", "List"))] == []


def test_scale_to_zero_on_instances_is_refused_pointing_at_serverless(
    settings: Settings, options: SageMakerOptions, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> None:
    on_instances = SageMakerServingBackend(settings, options)
    sagemaker = Captured(on_instances.client)
    with pytest.raises(ValueError, match=r"min_replicas 0 .* keeps at least one instance.*SERVERLESS_MEMORY_MB"):
        on_instances.deploy("bincount-zero", models[1], "g:1", scaling=ScalingConfig(min_replicas=0))
    assert [op for op, _ in sagemaker.requests if not op.startswith(("Describe", "List"))] == []


def test_serverless_on_a_gpu_instance_type_is_refused_when_the_options_load() -> None:
    with pytest.raises(SettingsError, match=r"deploy_instance_type ml\.g5\.xlarge has an accelerator: .*CPU only"):
        SageMakerOptions.load(serverless_memory_mb=2048, deploy_instance_type="ml.g5.xlarge")
    with pytest.raises(SettingsError, match="serverless_memory_mb: Input should be 1024, 2048"):
        SageMakerOptions.load(serverless_memory_mb=1000)
