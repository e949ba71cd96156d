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

SageMaker moves a canary's or linear step's traffic in whole instances of the new fleet, and a canary is at
most half of them, a linear step 10-50%: with one instance no canary can be expressed. :func:`traffic_steps`
finds the instance count a strategy's share needs (a 10% canary: 1 of 10 instances), the new fleet runs
that many for the update (``CanarySize`` / ``LinearStepSize`` as ``INSTANCE_COUNT``), and the endpoint is
scaled back to its own count once the update is done; past ``rollout_max_instances`` the deploy is refused.

Autoscaling is Application Auto Scaling's target tracking on ``SageMakerVariantInvocationsPerInstance``
for the production variant (``ResourceId`` ``endpoint/<name>/variant/AllTraffic``).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass
from typing import Any

from botocore.exceptions import ClientError

from bincount.contracts.serving import DeployError, RolloutStrategy, ScalingConfig, TrafficStats

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


@dataclass(frozen=True)
class TrafficSteps:
    """A canary or linear update in whole instances: ``batch`` of the new fleet's ``instances`` take each traffic
    step (SageMaker splits traffic by capacity, so a step's share of requests is ``batch / instances``), and the
    endpoint goes back to ``serving`` instances after the update."""

    instances: int
    batch: int
    serving: int

    @property
    def share_percent(self) -> float:
        return round(100 * self.batch / self.instances, 1)

    @property
    def raised(self) -> bool:
        """Whether the update runs more instances than the endpoint serves with."""
        return self.instances > self.serving

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "share_percent": self.share_percent}


def steps_fit(kind: str, percent: int, instances: int) -> bool:
    """SageMaker's rule for a step of ``percent``% of ``instances`` (in whole instances, never more than asked):
    at least one instance, a canary at most half of them, a linear step 10-50% of them."""
    batch = percent * instances // 100
    if batch < 1 or 2 * batch > instances:
        return False
    return kind == "canary" or 10 * batch >= instances


def fewest_instances(kind: str, percent: int, serving: int) -> int:
    """The fewest instances, at least ``serving`` (and two), that hold a ``percent``% ``kind`` step (some count
    within 100 more always does, for the percents :func:`check_strategy` lets through)."""
    start = max(serving, 2)
    return next(n for n in range(start, start + 101) if steps_fit(kind, percent, n))


def traffic_steps(strategy: RolloutStrategy, serving: int, max_instances: int) -> TrafficSteps | None:
    """The instances a canary or linear ``strategy`` needs on an endpoint serving with ``serving`` instances: the
    fewest, at least ``serving``, whose whole-instance share of at most ``traffic_percent`` SageMaker accepts.
    None for the other strategies (they shift no share).

    Raises:
        DeployError: it needs more than ``max_instances``, or its steps take longer than SageMaker allows; the
            message names the share and the count, and how to proceed. Nothing has changed yet.
    """
    kind, percent = strategy.kind, strategy.traffic_percent
    if kind not in ("canary", "linear"):
        return None
    needed = fewest_instances(kind, percent, serving)
    allowed = max(max_instances, serving)
    if needed > allowed:
        lowest = 1 if kind == "canary" else 10
        fitting = [p for p in range(lowest, 51) if fewest_instances(kind, p, serving) <= allowed]
        raise DeployError(
            f"a {percent}% {kind} needs {needed} instances: SageMaker moves traffic by whole instances of the new "
            f"fleet ({percent * needed // 100} of {needed} take the {kind}'s share) and a "
            + ("canary is at most half of them" if kind == "canary" else "linear step is 10-50% of them")
            + f"; the endpoint serves with {serving} and rollout_max_instances allows {allowed}. Allow "
            f"{needed} (BINCOUNT_SAGEMAKER_ROLLOUT_MAX_INSTANCES={needed}; the extra instances bill for the rollout "
            f"only), or ask for a share of at least {fitting[0]}%, which fits in {allowed}; the endpoint keeps "
            "serving its current model"
        )
    steps = TrafficSteps(instances=needed, batch=percent * needed // 100, serving=serving)
    if bake_total_s(strategy, steps) + PROVISIONING_S > MAX_EXECUTION_S:
        raise DeployError(
            f"{kind} in {math.ceil(needed / steps.batch)} steps of {steps.batch} of {needed} instances baking "
            f"{strategy.bake_seconds:g} s each takes {bake_total_s(strategy, steps)} s, past SageMaker's "
            f"{MAX_EXECUTION_S} s limit on a deployment (with {PROVISIONING_S} s to start the fleet): bake less or "
            "step more; the endpoint keeps serving its current model"
        )
    return steps


def bake_total_s(strategy: RolloutStrategy, steps: TrafficSteps | None = None) -> int:
    """How long the traffic steps of a guarded update bake in all (the last bake follows the full shift); a linear
    update's steps are counted in ``steps``' instances where given, else in percent."""
    linear = math.ceil(steps.instances / steps.batch) if steps else math.ceil(100 / strategy.traffic_percent)
    count = {"all-at-once": 1, "canary": 2, "linear": linear}[strategy.kind]
    return count * round(strategy.bake_seconds)


def deployment_config(strategy: RolloutStrategy, alarms: list[str], steps: TrafficSteps | None) -> dict[str, Any]:
    """UpdateEndpoint's DeploymentConfig for ``strategy`` (all-at-once, canary or linear, the latter two in
    ``steps``' whole instances)."""
    routing: dict[str, Any] = {
        "Type": TRAFFIC_ROUTING[strategy.kind],
        "WaitIntervalInSeconds": round(strategy.bake_seconds),
    }
    if steps is not None:
        size = {"Type": "INSTANCE_COUNT", "Value": steps.batch}
        routing["CanarySize" if strategy.kind == "canary" else "LinearStepSize"] = size
    return {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": routing,
            "TerminationWaitInSeconds": 0,
            "MaximumExecutionTimeoutInSeconds": max(600, bake_total_s(strategy, steps) + PROVISIONING_S),
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
    def variant_metrics(self, endpoint: str, variant: str, start: dt.datetime, end: dt.datetime) -> TrafficStats:
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
        p99_ms = round(max(latencies) / 1000, 3) if latencies else None  # ModelLatency is in µs
        return TrafficStats(requests=invocations, errors=errors, p99_ms=p99_ms)  # errors: 5xx

    # alarms --------------------------------------------------------------------------------
    def ensure_alarms(self, endpoint: str, strategy: RolloutStrategy) -> tuple[list[str], TrafficStats]:
        """Write the endpoint's alarms for ``strategy``; their names, and the baseline they were derived from."""
        now = dt.datetime.now(dt.UTC)
        baseline = self.variant_metrics(endpoint, VARIANT, now - dt.timedelta(seconds=BASELINE_S), now)
        errors_name, latency_name = alarm_names(endpoint)
        current_rate = baseline.error_rate
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
        if baseline.p99_ms is None:
            self.cloudwatch.delete_alarms(AlarmNames=[latency_name])  # a stale threshold must not linger
        else:
            threshold_us = baseline.p99_ms * 1000 * strategy.max_latency_ratio
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
