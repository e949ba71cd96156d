"""SageMaker's deployment guardrails, shadow reports and autoscaling for one endpoint.

A guarded update is ``UpdateEndpoint`` with a ``DeploymentConfig``: SageMaker starts the new fleet
beside the old one, moves traffic to it (all at once, a canary share then the rest, or linear steps),
bakes each step for ``bake_seconds`` while it watches CloudWatch alarms, and rolls every bit of
traffic back to the old fleet by itself when one of them fires. The alarms are the project's, named
after the endpoint and rewritten (``PutMetricAlarm`` overwrites) before each guarded update, with
thresholds derived from the strategy and the current model's own last hour of metrics:

- ``<endpoint>-bincount-5xx``: the variant's 5xx error rate over one minute
  (``Invocation5XXErrors / Invocations``, counted once the minute has ``min_requests`` invocations)
  above the current model's rate of the last hour plus ``max_error_rate_increase``;
- ``<endpoint>-bincount-latency``: the variant's p99 ``ModelLatency`` over one minute above the
  current model's p99 of the last hour times ``max_latency_ratio`` (left out, and any earlier one
  deleted, when the last hour had no traffic to measure a baseline from).

Both watch the variant's metrics, which the old and the new fleet both report under during the
update: a new model that is worse pulls the whole variant past its own baseline.

Autoscaling is Application Auto Scaling's target tracking on ``SageMakerVariantInvocationsPerInstance``
for the production variant (``ResourceId`` ``endpoint/<name>/variant/AllTraffic``).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from botocore.exceptions import ClientError

from bincount.contracts.serving import DeployError, RolloutStrategy, ScalingConfig

VARIANT = "AllTraffic"  # the SageMaker SDK's name for an endpoint config's one production variant
SHADOW_VARIANT = "Shadow"
NAMESPACE = "AWS/SageMaker"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
ALARM_PERIOD_S = 60
BASELINE_S = 3600  # the current model's metrics over this long set the alarms' thresholds
PROVISIONING_S = 1800  # allowed for SageMaker to start the new fleet, on top of the bakes
MAX_EXECUTION_S = 28800  # BlueGreenUpdatePolicy.MaximumExecutionTimeoutInSeconds at most
MAX_WAIT_INTERVAL_S = 3600  # TrafficRoutingConfig.WaitIntervalInSeconds at most
TRAFFIC_ROUTING = {"all-at-once": "ALL_AT_ONCE", "canary": "CANARY", "linear": "LINEAR"}


def check_strategy(strategy: RolloutStrategy) -> None:
    """SageMaker's own limits on a strategy the contract allows; raises DeployError before anything changes."""
    kind, percent = strategy.kind, strategy.traffic_percent
    fix = "pick values inside SageMaker's limits and deploy again; the endpoint keeps serving its current model"
    if kind == "canary" and percent > 50:
        raise DeployError(f"a SageMaker canary is at most 50% of the fleet's capacity, not {percent}%: {fix}")
    if kind == "linear" and not 10 <= percent <= 50:
        raise DeployError(f"a SageMaker linear step is 10-50% of the fleet's capacity, not {percent}%: {fix}")
    if kind != "shadow" and strategy.bake_seconds > MAX_WAIT_INTERVAL_S:
        raise DeployError(
            f"SageMaker bakes a traffic step {MAX_WAIT_INTERVAL_S} s at most, not {strategy.bake_seconds:g} s: {fix}"
        )
    if kind != "shadow" and bake_total_s(strategy) + PROVISIONING_S > MAX_EXECUTION_S:
        raise DeployError(
            f"{kind} in steps of {percent}% baking {strategy.bake_seconds:g} s each takes {bake_total_s(strategy)} s, "
            f"past SageMaker's {MAX_EXECUTION_S} s limit on a deployment (with {PROVISIONING_S} s to start the fleet): "
            f"{fix}"
        )


def bake_total_s(strategy: RolloutStrategy) -> int:
    """How long the traffic steps of a guarded update bake in all (the last bake follows the full shift)."""
    steps = {"all-at-once": 1, "canary": 2, "linear": math.ceil(100 / strategy.traffic_percent)}[strategy.kind]
    return steps * round(strategy.bake_seconds)


def deployment_config(strategy: RolloutStrategy, alarms: list[str]) -> dict[str, Any]:
    """UpdateEndpoint's DeploymentConfig for ``strategy`` (all-at-once, canary or linear)."""
    routing: dict[str, Any] = {
        "Type": TRAFFIC_ROUTING[strategy.kind],
        "WaitIntervalInSeconds": round(strategy.bake_seconds),
    }
    size = {"Type": "CAPACITY_PERCENT", "Value": strategy.traffic_percent}
    if strategy.kind == "canary":
        routing["CanarySize"] = size
    elif strategy.kind == "linear":
        routing["LinearStepSize"] = size
    return {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": routing,
            "TerminationWaitInSeconds": 0,
            "MaximumExecutionTimeoutInSeconds": max(600, bake_total_s(strategy) + PROVISIONING_S),
        },
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": name} for name in alarms]},
    }


def dimensions(endpoint: str, variant: str = VARIANT) -> list[dict[str, str]]:
    return [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}]


def alarm_names(endpoint: str) -> tuple[str, str]:
    return f"{endpoint}-bincount-5xx", f"{endpoint}-bincount-latency"


class Guardrails:
    """The alarms of guarded updates, the per-variant metrics a shadow report reads, and autoscaling."""

    def __init__(self, cloudwatch: Any, autoscaling: Any) -> None:
        self.cloudwatch, self.autoscaling = cloudwatch, autoscaling

    # metrics -------------------------------------------------------------------------------
    def variant_metrics(self, endpoint: str, variant: str, start: dt.datetime, end: dt.datetime) -> dict[str, Any]:
        """One variant's invocations, 5xx errors and p99 model latency (ms) between ``start`` and ``end``, in one
        period from ``start``'s minute to the minute past ``end`` (CloudWatch's periods are whole minutes)."""
        start = start.replace(second=0, microsecond=0)
        period = max(60, math.ceil((end - start).total_seconds() / 60) * 60)
        end = start + dt.timedelta(seconds=period)
        queries = [
            ("invocations", "Invocations", "Sum"),
            ("errors", "Invocation5XXErrors", "Sum"),
            ("latency", "ModelLatency", "p99"),
        ]
        answer = self.cloudwatch.get_metric_data(
            MetricDataQueries=[
                {
                    "Id": query_id,
                    "MetricStat": {
                        "Metric": {
                            "Namespace": NAMESPACE,
                            "MetricName": metric,
                            "Dimensions": dimensions(endpoint, variant),
                        },
                        "Period": period,
                        "Stat": stat,
                    },
                }
                for query_id, metric, stat in queries
            ],
            StartTime=start,
            EndTime=end,
        )
        values = {
            result["Id"]: [v for v in result["Values"] if v is not None] for result in answer["MetricDataResults"]
        }
        invocations = int(sum(values.get("invocations", [])))
        errors = int(sum(values.get("errors", [])))
        latencies = values.get("latency", [])
        return {
            "requests": invocations,
            "errors": errors,  # 5xx
            "p99_ms": round(max(latencies) / 1000, 3) if latencies else None,  # ModelLatency is in µs
        }

    # alarms --------------------------------------------------------------------------------
    def ensure_alarms(self, endpoint: str, strategy: RolloutStrategy) -> tuple[list[str], dict[str, Any]]:
        """Write the endpoint's alarms for ``strategy``; their names, and the baseline they were derived from."""
        now = dt.datetime.now(dt.UTC)
        baseline = self.variant_metrics(endpoint, VARIANT, now - dt.timedelta(seconds=BASELINE_S), now)
        errors_name, latency_name = alarm_names(endpoint)
        current_rate = baseline["errors"] / baseline["requests"] if baseline["requests"] else 0.0
        error_threshold = current_rate + strategy.max_error_rate_increase
        metric = {"Namespace": NAMESPACE, "Dimensions": dimensions(endpoint)}
        self.cloudwatch.put_metric_alarm(
            AlarmName=errors_name,
            AlarmDescription=(
                f"bincount guardrail of {endpoint}: 5xx error rate above {error_threshold:.4f} (the current model's "
                f"{current_rate:.4f} + {strategy.max_error_rate_increase}) in a minute of at least "
                f"{strategy.min_requests} invocations; SageMaker rolls a guarded update back when it fires"
            ),
            Metrics=[
                {
                    "Id": "errors",
                    "MetricStat": {
                        "Metric": {**metric, "MetricName": "Invocation5XXErrors"},
                        "Period": ALARM_PERIOD_S,
                        "Stat": "Sum",
                    },
                    "ReturnData": False,
                },
                {
                    "Id": "invocations",
                    "MetricStat": {
                        "Metric": {**metric, "MetricName": "Invocations"},
                        "Period": ALARM_PERIOD_S,
                        "Stat": "Sum",
                    },
                    "ReturnData": False,
                },
                {
                    "Id": "error_rate",
                    "Expression": f"IF(invocations >= {strategy.min_requests}, errors / invocations, 0)",
                    "Label": "5xx error rate",
                    "ReturnData": True,
                },
            ],
            EvaluationPeriods=1,
            Threshold=round(error_threshold, 6),
            ComparisonOperator="GreaterThanThreshold",
            TreatMissingData="notBreaching",
        )
        names = [errors_name]
        if baseline["p99_ms"] is None:
            self.cloudwatch.delete_alarms(AlarmNames=[latency_name])  # a stale threshold must not linger
        else:
            threshold_us = baseline["p99_ms"] * 1000 * strategy.max_latency_ratio
            self.cloudwatch.put_metric_alarm(
                AlarmName=latency_name,
                AlarmDescription=(
                    f"bincount guardrail of {endpoint}: p99 ModelLatency above {threshold_us:.0f} µs (the current "
                    f"model's p99 of the last hour x {strategy.max_latency_ratio}); SageMaker rolls a guarded update "
                    "back when it fires"
                ),
                MetricName="ModelLatency",
                **metric,
                ExtendedStatistic="p99",
                Period=ALARM_PERIOD_S,
                EvaluationPeriods=1,
                Threshold=round(threshold_us, 1),
                ComparisonOperator="GreaterThanThreshold",
                TreatMissingData="notBreaching",
            )
            names.append(latency_name)
        return names, baseline

    def fired(self, alarms: list[str], since: dt.datetime) -> list[str]:
        """The alarms in ALARM, or that changed state since ``since`` (each with CloudWatch's reason)."""
        found = self.cloudwatch.describe_alarms(AlarmNames=alarms)["MetricAlarms"]
        return [
            f"{alarm['AlarmName']} ({alarm['StateValue']}: {alarm.get('StateReason', '')})"
            for alarm in found
            if alarm["StateValue"] == "ALARM" or alarm["StateUpdatedTimestamp"] >= since
        ]

    def delete_alarms(self, endpoint: str) -> None:
        self.cloudwatch.delete_alarms(AlarmNames=list(alarm_names(endpoint)))

    # autoscaling ---------------------------------------------------------------------------
    def apply_scaling(self, endpoint: str, scaling: ScalingConfig) -> None:
        """Target tracking between ``min_replicas`` and ``max_replicas``, or none for a fixed count."""
        target = {
            "ServiceNamespace": "sagemaker",
            "ResourceId": f"endpoint/{endpoint}/variant/{VARIANT}",
            "ScalableDimension": SCALABLE_DIMENSION,
        }
        policy = f"{endpoint}-bincount-invocations"
        if scaling.autoscaling:
            self.autoscaling.register_scalable_target(
                **target, MinCapacity=scaling.min_replicas, MaxCapacity=scaling.max_replicas
            )
            self.autoscaling.put_scaling_policy(
                PolicyName=policy,
                **target,
                PolicyType="TargetTrackingScaling",
                TargetTrackingScalingPolicyConfiguration={
                    "TargetValue": float(scaling.target_invocations_per_minute),
                    "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                    "ScaleOutCooldown": round(scaling.scale_out_cooldown_s),
                    "ScaleInCooldown": round(scaling.scale_in_cooldown_s),
                },
            )
            return
        registered = self.autoscaling.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[target["ResourceId"]], ScalableDimension=SCALABLE_DIMENSION
        )["ScalableTargets"]
        if not registered:
            return
        try:  # AWS drops a deregistered target's policies itself; deleting first is what its docs ask
            self.autoscaling.delete_scaling_policy(PolicyName=policy, **target)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ObjectNotFoundException":
                raise
        self.autoscaling.deregister_scalable_target(**target)
