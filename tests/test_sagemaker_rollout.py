"""Guarded updates (canary, linear, all-at-once with alarm auto-rollback), shadow variants and autoscaling on
SageMaker, against moto's SageMaker, CloudWatch and Application Auto Scaling APIs on loopback.

Every request is validated by botocore against the real service models. moto keeps the alarms, metrics,
scalable targets and policies for real, and the tests read them back. What moto lacks is modelled in
``sagemaker_moto.MotoSageMaker`` and said there: UpdateEndpoint and its DeploymentConfig (an alarm left in
ALARM by the bake rolls the update back, as SageMaker does), ShadowProductionVariants, and percentiles.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from sagemaker_moto import (
    BUCKET,
    REGION,
    Captured,
    MotoSageMaker,
    cloudwatch_state,
    model_archive,
    prediction,
    queue_answers,
    sagemaker_state,
)

from bincount.config import Settings
from bincount.contracts.serving import DeployError, EndpointRecord, RolloutStrategy, ScalingConfig, ServingError
from bincount.sagemaker.serving import SageMakerServingBackend
from bincount.sagemaker.session import SageMakerOptions

TARGET = "sagemaker:variant:DesiredInstanceCount"


@pytest.fixture
def backend(settings: Settings, options: SageMakerOptions) -> SageMakerServingBackend:
    guarded = options.model_copy(
        update={"cloudwatch_endpoint_url": options.endpoint_url, "autoscaling_endpoint_url": options.endpoint_url}
    )
    return SageMakerServingBackend(settings, guarded)


def traffic(
    backend: SageMakerServingBackend, endpoint: str, variant: str, latencies_ms: list[float], errors: int
) -> None:
    """The metrics SageMaker publishes for requests a variant answered (as real traffic would leave them)."""
    dimensions = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}]
    now = dt.datetime.now(dt.UTC)
    data = [
        {"MetricName": "Invocations", "Dimensions": dimensions, "Value": len(latencies_ms), "Timestamp": now},
        {"MetricName": "Invocation5XXErrors", "Dimensions": dimensions, "Value": errors, "Timestamp": now},
    ] + [
        {
            "MetricName": "ModelLatency",
            "Dimensions": dimensions,
            "Value": ms * 1000,
            "Timestamp": now,
            "Unit": "Microseconds",
        }
        for ms in latencies_ms
    ]
    backend.guardrails.cloudwatch.put_metric_data(Namespace="AWS/SageMaker", MetricData=data)


def scaling_state(backend: SageMakerServingBackend, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    resource = f"endpoint/{name}/variant/AllTraffic"
    client = backend.guardrails.autoscaling
    targets = client.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])["ScalableTargets"]
    policies = client.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)["ScalingPolicies"]
    return targets, policies


@dataclass(frozen=True)
class Guarded:
    """A new endpoint deployed with a canary strategy and autoscaling, and the requests each client sent."""

    name: str
    first: EndpointRecord
    sagemaker: Captured
    cloudwatch: Captured
    autoscaling: Captured

    @property
    def alarms(self) -> tuple[str, str]:
        """The guard's alarms: the error rate's, then the latency's."""
        return f"{self.name}-bincount-5xx", f"{self.name}-bincount-latency"


CANARY = RolloutStrategy("canary", traffic_percent=10, bake_seconds=300, max_latency_ratio=1.5)


@pytest.fixture
def guarded(backend: SageMakerServingBackend, models: dict[int, str], moto_sagemaker: MotoSageMaker) -> Guarded:
    sagemaker, cloudwatch = Captured(backend.client), Captured(backend.guardrails.cloudwatch)
    autoscaling = Captured(backend.guardrails.autoscaling)
    name = f"bincount-guard-{uuid.uuid4().hex[:8]}"
    scaling = ScalingConfig(min_replicas=2, max_replicas=4, target_invocations_per_minute=300, scale_in_cooldown_s=90)
    queue_answers(prediction(2))
    first = backend.deploy(name, models[1], "g:1", strategy=RolloutStrategy("canary"), scaling=scaling)
    # The current model's last hour sets the alarms' thresholds: 1 error in 100, p99 200 ms.
    traffic(backend, name, "AllTraffic", [100.0] * 98 + [200.0] * 2, errors=1)
    return Guarded(name, first, sagemaker, cloudwatch, autoscaling)


@pytest.fixture
def rolled_back(
    backend: SageMakerServingBackend, guarded: Guarded, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> EndpointRecord:
    """A canary of ``models[2]`` whose bake trips the latency alarm (as a model twice as slow would)."""
    latency_alarm = guarded.alarms[1]
    moto_sagemaker.bake = lambda alarms: cloudwatch_state().set_alarm_state(
        latency_alarm, "Threshold Crossed: 1 datapoint [410000.0] > 300000.0", "{}", "ALARM"
    )
    rolled = backend.deploy(guarded.name, models[2], "g:2", strategy=CANARY)
    moto_sagemaker.bake = None
    return rolled


def test_a_new_endpoint_starts_on_min_replicas_with_target_tracking_whatever_the_strategy(
    backend: SageMakerServingBackend, guarded: Guarded
) -> None:
    # A new endpoint starts on the model whatever the strategy (nothing to compare), on min_replicas instances,
    # with target tracking between min and max.
    sagemaker, first = guarded.sagemaker, guarded.first
    assert sagemaker("UpdateEndpoint") == [] and len(sagemaker("CreateEndpoint")) == 1
    (config,) = sagemaker("CreateEndpointConfig")
    assert config["ProductionVariants"][0]["InitialInstanceCount"] == 2
    assert first.rollout and first.rollout.verdict == "started" and first.replicas == 2
    (target,), (policy,) = scaling_state(backend, guarded.name)
    assert (target["MinCapacity"], target["MaxCapacity"], target["ScalableDimension"]) == (2, 4, TARGET)
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert policy["TargetTrackingScalingPolicyConfiguration"] == {
        "TargetValue": 300.0,
        "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
        "ScaleOutCooldown": 30,
        "ScaleInCooldown": 90,
    }
    guarded.autoscaling("RegisterScalableTarget"), guarded.autoscaling("PutScalingPolicy")  # validated


def test_a_canary_that_trips_its_latency_alarm_is_rolled_back_by_sagemaker(
    backend: SageMakerServingBackend, guarded: Guarded, rolled_back: EndpointRecord
) -> None:
    name, first = guarded.name, guarded.first
    errors_alarm, latency_alarm = guarded.alarms
    (update,) = guarded.sagemaker("UpdateEndpoint")  # validated: the DeploymentConfig is what SageMaker takes
    assert update["DeploymentConfig"] == {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {
                "Type": "CANARY",
                "WaitIntervalInSeconds": 300,
                "CanarySize": {"Type": "INSTANCE_COUNT", "Value": 1},  # 1 of 10 instances: 10%
            },
            "TerminationWaitInSeconds": 0,
            "MaximumExecutionTimeoutInSeconds": 2400,
        },
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": errors_alarm}, {"AlarmName": latency_alarm}]},
    }
    assert "RetainAllVariantProperties" not in update  # the canary's 10 instances, not autoscaling's 2
    rolled = rolled_back
    assert rolled.rollout and rolled.rollout.verdict == "rolled-back" and latency_alarm in rolled.rollout.reason
    assert [(step.action, step.percent) for step in rolled.rollout.steps] == [("rolled-back", 0)]
    assert (rolled.version, rolled.model_ref) == (first.version, "g:1")
    assert sagemaker_state().endpoints[name].endpoint_config_name == first.details["endpoint_config"]
    assert backend.describe(name).rollout == rolled.rollout


def test_the_guard_alarms_watch_the_variant_with_thresholds_from_its_traffic_and_the_strategy(
    backend: SageMakerServingBackend, guarded: Guarded, rolled_back: EndpointRecord
) -> None:
    name = guarded.name
    errors_alarm, latency_alarm = guarded.alarms
    guarded.cloudwatch("PutMetricAlarm"), guarded.cloudwatch("GetMetricData")  # validated
    alarms = {
        a["AlarmName"]: a
        for a in backend.guardrails.cloudwatch.describe_alarms(AlarmNames=[errors_alarm, latency_alarm])["MetricAlarms"]
    }
    latency = alarms[latency_alarm]
    variant = [{"Name": "EndpointName", "Value": name}, {"Name": "VariantName", "Value": "AllTraffic"}]
    assert (latency["Namespace"], latency["MetricName"], latency["ExtendedStatistic"]) == (
        "AWS/SageMaker",
        "ModelLatency",
        "p99",
    )
    assert latency["Dimensions"] == variant and latency["Threshold"] == pytest.approx(200_000 * 1.5)
    errors = alarms[errors_alarm]
    assert errors["Threshold"] == pytest.approx(0.01 + 0.01)  # the current 1% plus max_error_rate_increase
    metrics = {m["Id"]: m for m in errors["Metrics"]}
    assert metrics["error_rate"]["Expression"] == "IF(invocations >= 20, errors / invocations, 0)"
    assert metrics["errors"]["MetricStat"]["Metric"] == {
        "Namespace": "AWS/SageMaker",
        "MetricName": "Invocation5XXErrors",
        "Dimensions": variant,
    }


def test_a_good_canary_after_a_rollback_completes_and_moves_all_traffic(
    backend: SageMakerServingBackend, guarded: Guarded, rolled_back: EndpointRecord, models: dict[int, str]
) -> None:
    # No alarm fires, all traffic moves; the alarms are rewritten (their state back to OK).
    name = guarded.name
    queue_answers(prediction(3))
    second = backend.deploy(name, models[2], "g:2", strategy=CANARY)
    assert second.rollout and second.rollout.verdict == "completed" and second.previous_version == guarded.first.version
    assert sagemaker_state().endpoints[name].endpoint_config_name == second.details["endpoint_config"]
    assert (
        backend.client.describe_endpoint(EndpointName=name)["LastDeploymentConfig"]
        == second.rollout.backend["deployment_config"]
    )


def test_linear_steps_and_a_fixed_count_deregister_autoscaling(
    backend: SageMakerServingBackend, guarded: Guarded, models: dict[int, str]
) -> None:
    queue_answers(prediction(3))
    third = backend.deploy(
        guarded.name,
        models[3],
        "g:3",
        strategy=RolloutStrategy("linear", traffic_percent=25, bake_seconds=60),
        scaling=ScalingConfig(),
    )
    routing = guarded.sagemaker("UpdateEndpoint")[-1]["DeploymentConfig"]["BlueGreenUpdatePolicy"][
        "TrafficRoutingConfiguration"
    ]
    assert routing == {
        "Type": "LINEAR",
        "WaitIntervalInSeconds": 60,
        "LinearStepSize": {"Type": "INSTANCE_COUNT", "Value": 1},  # 1 of 4 instances: 25%
    }
    assert third.rollout and third.rollout.verdict == "completed" and scaling_state(backend, guarded.name) == ([], [])
    guarded.autoscaling("DeleteScalingPolicy"), guarded.autoscaling("DeregisterScalableTarget")  # validated


def test_strategies_outside_sagemakers_limits_are_refused_before_any_change(
    backend: SageMakerServingBackend, guarded: Guarded, models: dict[int, str]
) -> None:
    # A clear error before anything is asked of any API that changes something.
    captured = (guarded.sagemaker, guarded.cloudwatch, guarded.autoscaling)
    sent = sum(len(c.requests) for c in captured)
    for strategy, message in (
        (RolloutStrategy("canary", traffic_percent=60), "canary is at most 50%"),
        (RolloutStrategy("linear", traffic_percent=5), "linear step is 10-50%"),
        (RolloutStrategy("linear", traffic_percent=10, bake_seconds=3600), "past SageMaker's 28800 s limit"),
    ):
        with pytest.raises(DeployError, match=f"{message}.*keeps serving its current model"):
            backend.deploy(guarded.name, models[1], strategy=strategy)
    assert sum(len(c.requests) for c in captured) == sent


def test_delete_removes_the_guard_alarms(
    backend: SageMakerServingBackend, guarded: Guarded, rolled_back: EndpointRecord
) -> None:
    alarm_names = list(guarded.alarms)
    assert len(backend.guardrails.cloudwatch.describe_alarms(AlarmNames=alarm_names)["MetricAlarms"]) == 2
    backend.delete(guarded.name)
    assert backend.guardrails.cloudwatch.describe_alarms(AlarmNames=alarm_names)["MetricAlarms"] == []


def test_shadow_runs_beside_the_model_reports_and_is_promoted_or_stopped(
    backend: SageMakerServingBackend, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> None:
    sagemaker = Captured(backend.client)
    name = f"bincount-shadow-{uuid.uuid4().hex[:8]}"
    queue_answers(prediction(2))
    first = backend.deploy(name, models[1], "g:1")

    # A model counting other classes cannot shadow this one: refused before anything changes.
    s3 = boto3.client("s3", endpoint_url=backend.settings.s3_endpoint_url, region_name=REGION)
    key = f"bincount/models/{uuid.uuid4().hex}/model.tar.gz"
    s3.put_object(Bucket=BUCKET, Key=key, Body=model_archive(9, classes=(0, 1, 2)))
    before = len(sagemaker.requests)
    with pytest.raises(DeployError, match=r"counts \[0, 1, 2\].*counting \[1, 2, 3, 4, 5\].*Nothing was changed"):
        backend.deploy(name, f"s3://{BUCKET}/{key}", strategy=RolloutStrategy("shadow", traffic_percent=25))
    assert [op for op, _ in sagemaker.requests[before:]] == ["DescribeEndpoint"]

    queue_answers(prediction(2))
    # a coarse error sensitivity (+50%) keeps the minimum sample at min_requests (the current model: 4 times as many)
    coarse = RolloutStrategy("shadow", traffic_percent=25, min_requests=10, max_error_rate_increase=0.5)
    shadowed = backend.deploy(name, models[2], "g:2", strategy=coarse)
    config = sagemaker("CreateEndpointConfig")[-1]  # validated against the service model
    (production,), (shadow,) = config["ProductionVariants"], config["ShadowProductionVariants"]
    assert (production["VariantName"], production["ModelName"], production["InitialVariantWeight"]) == (
        "AllTraffic",
        first.details["model_name"],
        1.0,
    )
    assert (shadow["VariantName"], shadow["InitialVariantWeight"]) == ("Shadow", 0.25)
    assert shadowed.shadow is not None
    assert shadow["ModelName"] == shadowed.shadow.backend["model_name"] != first.details["model_name"]
    described = backend.client.describe_endpoint(EndpointName=name)
    assert described["EndpointConfigName"] == shadowed.details["endpoint_config"]
    assert described["ShadowProductionVariants"][0]["VariantName"] == "Shadow"
    # Users' answers still come from the current model: the record names it, the shadow beside it.
    assert shadowed.rollout and (shadowed.version, shadowed.rollout.verdict) == (first.version, "shadowing")
    assert [(v.id, v.model_ref, v.weight, v.shadow_percent) for v in shadowed.variants] == [
        ("AllTraffic", "g:1", 100, None),
        ("Shadow", "g:2", 0, 25),
    ]

    # The report reads both variants' CloudWatch metrics: too little traffic on the shadow, then a slow shadow.
    early = backend.shadow_report(name)
    assert not early.promote and "requests reached the shadow" in early.reason
    traffic(backend, name, "AllTraffic", [100.0] * 40, errors=0)
    traffic(backend, name, "Shadow", [300.0] * 10, errors=0)
    report = backend.shadow_report(name)
    assert (report.current.requests, report.shadow.requests) == (40, 10) and report.compared == 0
    assert not report.promote and "p99 latency 300 ms is over x1.5 the current 100 ms" in report.reason
    assert report.test and (report.test.needed_new, report.test.needed_current, report.test.p_value) == (10, 25, 1.0)

    promoted = backend.promote_shadow(name)
    assert (promoted.version, promoted.previous_version, promoted.model_ref) == (
        shadowed.shadow.version,
        first.version,
        "g:2",
    )
    assert promoted.rollout and promoted.rollout.verdict == "promoted"
    assert promoted.rollout.report and not promoted.rollout.report.promote
    now_serving = backend.client.describe_endpoint_config(EndpointConfigName=promoted.details["endpoint_config"])
    assert now_serving["ProductionVariants"][0]["ModelName"] == shadow["ModelName"]
    assert "ShadowProductionVariants" not in now_serving and promoted.shadow is None
    with pytest.raises(ServingError, match="has no shadow: deploy a model to it with strategy kind 'shadow'"):
        backend.promote_shadow(name)

    queue_answers(prediction(2))
    backend.deploy(name, models[3], "g:3", strategy=RolloutStrategy("shadow", traffic_percent=100))
    assert sagemaker("CreateEndpointConfig")[-1]["ShadowProductionVariants"][0]["InitialVariantWeight"] == 1.0
    queue_answers(prediction(2))
    stopped = backend.stop_shadow(name)
    assert stopped.rollout and (stopped.version, stopped.rollout.verdict) == (promoted.version, "stopped")
    assert sagemaker_state().endpoints[name].endpoint_config_name == promoted.details["endpoint_config"]
    backend.delete(name)


def test_all_at_once_without_traffic_has_no_latency_baseline_and_drops_a_stale_latency_alarm(
    backend: SageMakerServingBackend, models: dict[int, str], moto_sagemaker: MotoSageMaker
) -> None:
    sagemaker = Captured(backend.client)
    name = f"bincount-quiet-{uuid.uuid4().hex[:8]}"
    queue_answers(prediction(2))
    backend.deploy(name, models[1])
    stale = f"{name}-bincount-latency"  # an earlier deploy's latency alarm, from a busier hour
    backend.guardrails.cloudwatch.put_metric_alarm(
        AlarmName=stale,
        Namespace="AWS/SageMaker",
        MetricName="ModelLatency",
        ExtendedStatistic="p99",
        Period=60,
        EvaluationPeriods=1,
        Threshold=1.0,
        ComparisonOperator="GreaterThanThreshold",
    )
    queue_answers(prediction(3))
    record = backend.deploy(name, models[2], strategy=RolloutStrategy("all-at-once", bake_seconds=120))
    deployment = sagemaker("UpdateEndpoint")[-1]["DeploymentConfig"]
    assert deployment["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"] == {
        "Type": "ALL_AT_ONCE",
        "WaitIntervalInSeconds": 120,
    }
    assert deployment["AutoRollbackConfiguration"] == {"Alarms": [{"AlarmName": f"{name}-bincount-5xx"}]}
    assert backend.guardrails.cloudwatch.describe_alarms(AlarmNames=[stale])["MetricAlarms"] == []
    assert record.rollout and record.rollout.verdict == "completed"
    assert record.rollout.backend["baseline"]["requests"] == 0
    backend.delete(name)
