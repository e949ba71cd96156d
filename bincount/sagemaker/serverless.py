"""Serverless SageMaker endpoints: capacity SageMaker starts per request and stops when idle, instead of instances.

With ``BINCOUNT_SAGEMAKER_SERVERLESS_MEMORY_MB`` set, an endpoint config's production variant carries a
``ServerlessConfig`` (memory size, max concurrency) in place of an instance type and count. SageMaker serverless runs
on CPU only and serves one production variant without data capture, so a deploy that asks for what it lacks is
refused before anything changes (:func:`check_serverless`): data capture, a shadow variant, a guarded rollout
(its alarms' traffic steps move whole instances) and instance autoscaling (it scales itself, to zero too).
"""

from __future__ import annotations

import re
from typing import Any

from bincount.contracts.serving import CaptureConfig, RolloutStrategy, ScalingConfig

MEMORY_SIZES_MB = (1024, 2048, 3072, 4096, 5120, 6144)  # ProductionVariantServerlessConfig.MemorySizeInMB
_ACCELERATED = re.compile(r"ml\.(g\d|p\d|inf\d|trn\d|eia)")  # GPU, Inferentia, Trainium instance families


def is_accelerated(instance_type: str) -> bool:
    """Whether ``instance_type`` has a GPU or another accelerator (``ml.g5.xlarge``, ``ml.p3.2xlarge``,
    ``ml.inf2.xlarge``)."""
    return bool(_ACCELERATED.match(instance_type))


def serverless_config(memory_mb: int, max_concurrency: int) -> dict[str, int]:
    """A production variant's ``ServerlessConfig``."""
    return {"MemorySizeInMB": memory_mb, "MaxConcurrency": max_concurrency}


def check_serverless(
    serverless: dict[str, int] | None,
    capture: CaptureConfig | None,
    strategy: RolloutStrategy | None,
    scaling: ScalingConfig | None,
) -> None:
    """For a ``serverless`` endpoint (a :func:`serverless_config`; None: instances, which do everything), refuse what
    it cannot do, naming the option at fault and what to do instead.

    Raises:
        ValueError: data capture, any rollout strategy (canary, linear, all-at-once with alarms, shadow) or
            autoscaling was asked of a serverless endpoint, or scale to zero of one on instances; nothing has
            changed.
    """
    if serverless is None:
        if scaling is not None and scaling.scales_to_zero:
            raise ValueError(
                "min_replicas 0 (scale to zero) on a SageMaker endpoint on instances: a real-time endpoint keeps at "
                "least one instance running. Set min_replicas to 1 or more, or deploy it serverless "
                "(BINCOUNT_SAGEMAKER_SERVERLESS_MEMORY_MB), which scales to zero by itself"
            )
        return
    unset = "or unset BINCOUNT_SAGEMAKER_SERVERLESS_MEMORY_MB to deploy on instances, which do all of it"
    if capture is not None and capture.enabled:
        raise ValueError(
            f"data capture (sampling_percentage {capture.sampling_percentage}) on a serverless SageMaker endpoint: "
            f"SageMaker serverless does not capture requests. Deploy with sampling_percentage=0, {unset}"
        )
    if strategy is not None and strategy.kind == "shadow":
        raise ValueError(
            "strategy 'shadow' on a serverless SageMaker endpoint: SageMaker serverless serves one production "
            "variant and no shadow variant. Compare the models offline (evaluate) and deploy without a strategy, "
            f"{unset}"
        )
    if strategy is not None:
        raise ValueError(
            f"strategy {strategy.kind!r} on a serverless SageMaker endpoint: deployment guardrails (alarm-watched "
            "bakes, canary and linear traffic steps) move traffic between instance fleets, which a serverless "
            f"endpoint has none of. Deploy without a strategy (a plain blue/green update, checked by a smoke request), "
            f"{unset}"
        )
    if scaling is not None and scaling.autoscaling:
        raise ValueError(
            f"autoscaling (min_replicas {scaling.min_replicas}, max_replicas {scaling.max_replicas}) on a serverless "
            "SageMaker endpoint: it scales itself, to zero when idle, up to BINCOUNT_SAGEMAKER_SERVERLESS_MAX_"
            f"CONCURRENCY requests at once. Deploy without scaling, {unset}"
        )


def capacity(serverless: dict[str, int] | None, instance_type: str, count: int) -> dict[str, Any]:
    """What a production variant runs on: ``serverless`` (a :func:`serverless_config`) where given, else instances."""
    if serverless:
        return {"ServerlessConfig": serverless}
    return {"InitialInstanceCount": count, "InstanceType": instance_type}
