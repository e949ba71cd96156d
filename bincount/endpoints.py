"""Endpoint records under the artifact root (``endpoints/<name>.json``), and the smoke request a new model must answer.

Both serving backends keep their records here, so `bincount endpoints` and the flows read an
endpoint the same way whichever backend serves it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bincount.config import Settings
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.serving import (
    CaptureConfig,
    EndpointRecord,
    RolloutStrategy,
    RolloutTest,
    ScalingConfig,
    ShadowReport,
    TrafficStats,
)
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.stats import POWER, ErrorRateTest, error_rate_test, two_proportion_sample_size
from bincount.storage import ObjectNotFoundError, Storage


class EndpointRecords:
    """Read, write and delete the records of named endpoints."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage

    def uri(self, name: str) -> str:
        return self.settings.artifact_uri("endpoints", f"{check_endpoint_name(name)}.json")

    def read(self, name: str) -> EndpointRecord | None:
        try:
            return EndpointRecord.from_dict(json.loads(self.storage.read_bytes(self.uri(name))))
        except ObjectNotFoundError:
            return None

    def write(self, record: EndpointRecord) -> None:
        self.storage.write_bytes(self.uri(record.name), json.dumps(record.to_dict(), indent=2).encode())

    def delete(self, name: str) -> None:
        self.storage.delete(self.uri(name))

    def names(self) -> list[str]:
        """Every recorded endpoint's name."""
        base = self.settings.artifact_uri("endpoints").rstrip("/") + "/"
        return sorted(
            info.uri[len(base) : -len(".json")]
            for info in self.storage.list(self.settings.artifact_uri("endpoints"))
            if info.uri.endswith(".json") and "/" not in info.uri[len(base) :]
        )


def smoke_image(image_size: int) -> bytes:
    """A synthetic bin photo (two items) at the model's size, to check a new model end to end."""
    return jpeg_bytes(render_bin_image(2, np.random.default_rng(0), size=max(image_size, 32)))


def recorded_capture(record: EndpointRecord | None) -> CaptureConfig:
    """The capture setting an endpoint was last deployed with (off for a new one)."""
    return (record.capture if record else None) or CaptureConfig()


def recorded_scaling(record: EndpointRecord | None) -> ScalingConfig:
    """The scaling an endpoint was last deployed with (one replica for a new one, or one deployed without any)."""
    return (record.scaling if record else None) or ScalingConfig()


ERROR_ALPHA = 0.05  # a new model whose error rate is higher at this level is rolled back (one-sided)


@dataclass(frozen=True)
class RolloutCheck:
    """One look at a new model beside the current one: "fail" (worse: roll back / do not promote), "pass" (past
    the minimum sample and not worse) or "wait" (too few requests yet to tell). ``needed``: the requests on the
    new and the current model before it may pass, sized from the strategy's ``max_error_rate_increase``."""

    verdict: Literal["fail", "pass", "wait"]
    reason: str
    errors: ErrorRateTest
    needed: tuple[int, int]

    def summary(self) -> RolloutTest:
        """What a rollout step or a shadow report keeps of it."""
        return RolloutTest(self.verdict, self.errors.test, self.errors.p_value, ERROR_ALPHA, POWER, *self.needed)


def needed_requests(strategy: RolloutStrategy, current_rate: float, ratio: float) -> tuple[int, int]:
    """Requests on the new and the current model (``ratio`` times as many) before a rollout may pass: enough for
    Fisher's test to see an error rate ``max_error_rate_increase`` above ``current_rate`` with power 0.8, and at
    least ``min_requests`` each. An increase of 0 cannot be sized (no sample sees it): ``min_requests`` then."""
    increase = min(strategy.max_error_rate_increase, 1.0)
    sized = (
        two_proportion_sample_size(min(current_rate, 1 - increase), increase, ERROR_ALPHA, POWER, ratio)
        if increase > 0
        else (0, 0)
    )
    return max(sized[0], strategy.min_requests), max(sized[1], strategy.min_requests)


def judge_rollout(
    current: TrafficStats, new: TrafficStats, strategy: RolloutStrategy, ratio: float, arm: str = "new model"
) -> RolloutCheck:
    """Judge a canary step or a shadow from both variants' traffic; ``ratio``:
    the current model's requests per new-model request the routing plans (a 10% canary: 9).

    Errors fail the new model as soon as Fisher's exact test finds its rate higher at ``ERROR_ALPHA``, at any
    sample: a canary is looked at again and again, which makes a false rollback likelier than 5%, never a worse
    model kept longer. It passes only past the minimum sample (:func:`needed_requests`); latency is compared
    only there too, as a p99 of a few requests is one request's latency.
    """
    errors = error_rate_test(current.errors, current.requests, new.errors, new.requests)
    needed = needed_requests(strategy, current.error_rate, ratio)
    figures = f"{errors.test} p={errors.p_value:.3g}"
    if errors.p_value < ERROR_ALPHA:
        return RolloutCheck("fail", f"{errors.counts()}: higher by {figures} < {ERROR_ALPHA}", errors, needed)
    if new.requests < needed[0] or current.requests < needed[1]:
        reason = (
            f"only {new.requests} requests reached the {arm} ({needed[0]} needed, and {needed[1]} on the current "
            f"model, for Fisher's test to see +{strategy.max_error_rate_increase:.1%} errors with power {POWER})"
        )
        return RolloutCheck("wait", reason, errors, needed)
    old_p99, new_p99 = current.p99_ms, new.p99_ms
    if old_p99 and new_p99 and new_p99 > strategy.max_latency_ratio * old_p99:
        reason = (
            f"its p99 latency {new_p99:.0f} ms is over x{strategy.max_latency_ratio} the current {old_p99:.0f} ms "
            f"({new.requests} and {current.requests} requests, past the minimum of {needed[0]} and {needed[1]})"
        )
        return RolloutCheck("fail", reason, errors, needed)
    reason = (
        f"{errors.counts()}, not higher ({figures}); {new.requests} and {current.requests} requests, past the "
        f"{needed[0]} and {needed[1]} that see +{strategy.max_error_rate_increase:.1%} errors with power {POWER}; "
        f"p99 within x{strategy.max_latency_ratio}"
    )
    return RolloutCheck("pass", reason, errors, needed)


def shadow_verdict(
    current: TrafficStats,
    shadow: TrafficStats,
    strategy: RolloutStrategy,
    *,
    compared: int = 0,
    agreed: int = 0,
    skipped: int = 0,
    since: str | None = None,
) -> ShadowReport:
    """Whether to promote a shadow, from both variants' traffic and how many of the shadow's counts were
    ``compared`` with the current model's (``agreed``): the rule of a canary step (:func:`judge_rollout`), the
    shadow's arm being the ``traffic_percent`` of requests it gets a copy of. Agreement is reported, not judged: a
    better model disagrees exactly where the current one is wrong."""
    check = judge_rollout(current, shadow, strategy, 100 / strategy.traffic_percent, arm="shadow")
    return ShadowReport(
        current=current,
        shadow=shadow,
        compared=compared,
        agreement=agreed / compared if compared else None,
        skipped=skipped,
        promote=check.verdict == "pass",
        reason=check.reason,
        test=check.summary(),
        since=since,
    )
