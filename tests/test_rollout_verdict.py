"""The canary and shadow verdict (bincount.endpoints.judge_rollout, shadow_verdict) on constructed counts: Fisher's
exact test on errors at any sample, a pass and a latency comparison only past the minimum sample the strategy's
sensitivity asks for; and the endpoint records those verdicts are kept in, old and new."""

from __future__ import annotations

import pytest

from bincount.contracts.serving import (
    EndpointRecord,
    EndpointVariant,
    RolloutStrategy,
    RolloutTest,
    ScalingConfig,
    ShadowVariant,
    TrafficStats,
)
from bincount.endpoints import judge_rollout, needed_requests, shadow_verdict
from bincount.stats import two_proportion_sample_size

CANARY = RolloutStrategy(kind="canary", traffic_percent=10, min_requests=20, max_error_rate_increase=0.01)
TEN_PERCENT = 9.0  # current-model requests per canary request


def variant(requests: int, errors: int = 0, p99_ms: float | None = 10.0) -> TrafficStats:
    return TrafficStats(requests, errors, p99_ms)


def test_the_minimum_sample_comes_from_the_sensitivity_asked_for() -> None:
    assert needed_requests(CANARY, 0.0, TEN_PERCENT) == two_proportion_sample_size(0.0, 0.01, ratio=9) == (293, 2633)
    coarse = RolloutStrategy(kind="canary", min_requests=20, max_error_rate_increase=0.5)
    assert needed_requests(coarse, 0.0, 1.0) == (20, 20), "min_requests stays a floor"
    untestable = RolloutStrategy(kind="canary", min_requests=20, max_error_rate_increase=0.0)
    assert needed_requests(untestable, 0.0, 1.0) == (20, 20), "no sample sees an increase of 0"
    assert needed_requests(CANARY, 0.05, TEN_PERCENT)[0] > 293, "a noisier baseline needs more"


def test_errors_fail_a_canary_by_fishers_test_before_the_minimum_sample() -> None:
    check = judge_rollout(variant(90), variant(10, errors=3), CANARY, TEN_PERCENT)
    assert check.verdict == "fail" and check.errors.p_value == pytest.approx(10 * 9 * 8 / (100 * 99 * 98))
    assert check.reason.startswith("error rate 3/10 on the new model against 0/90 on the current one: higher by ")
    assert "Fisher's exact test, one-sided p=0.000742 < 0.05" in check.reason, check.reason
    assert (check.summary().needed_new, check.summary().needed_current) == (293, 2633)


def test_an_error_or_two_that_chance_explains_waits_for_more_requests() -> None:
    """2 errors in 20 requests of a 50% canary against none in 20: the old rule (10% observed against +1% allowed)
    rolled back; Fisher's test gives p = C(20, 2) / C(40, 2) = 0.24, so the canary bakes on. The same two errors
    on a 10% canary (20 requests against 180) are evidence: p = C(20, 2) / C(200, 2) = 0.0095."""
    check = judge_rollout(variant(20), variant(20, errors=2), CANARY, 1.0)
    assert check.verdict == "wait" and check.errors.p_value == pytest.approx(190 / 780)
    assert check.reason.startswith("only 20 requests reached the new model (802 needed, and 802 on the current")
    check = judge_rollout(variant(180), variant(20, errors=2), CANARY, TEN_PERCENT)
    assert check.verdict == "fail" and check.errors.p_value == pytest.approx(190 / 19900)


def test_a_clean_canary_passes_only_past_the_minimum_sample() -> None:
    assert judge_rollout(variant(2000), variant(292), CANARY, TEN_PERCENT).verdict == "wait"
    check = judge_rollout(variant(2633), variant(293), CANARY, TEN_PERCENT)
    assert check.verdict == "pass" and check.reason.startswith(
        "error rate 0/293 on the new model against 0/2633 on the current one, not higher (Fisher's exact test"
    ), check.reason


def test_latency_is_compared_only_past_the_minimum_sample() -> None:
    slow = variant(100, p99_ms=900.0)
    assert judge_rollout(variant(900), slow, CANARY, TEN_PERCENT).verdict == "wait", "a few requests' p99"
    check = judge_rollout(variant(2700), variant(300, p99_ms=900.0), CANARY, TEN_PERCENT)
    assert check.verdict == "fail" and check.reason.startswith("its p99 latency 900 ms is over x1.5 the current 10 ms")


def test_a_shadow_is_promoted_by_the_same_rule_with_its_copy_share_as_the_arm() -> None:
    shadow = RolloutStrategy(kind="shadow", traffic_percent=100, min_requests=10, max_error_rate_increase=0.5)
    report = shadow_verdict(variant(12), variant(12), shadow, compared=12, agreed=9)
    assert report.promote is True and report.agreement == 0.75, report
    assert report.test is not None and (report.test.needed_new, report.test.needed_current) == (12, 12)
    assert report.test.test.startswith("Fisher")
    early = shadow_verdict(variant(5), variant(5), shadow)
    assert early.promote is False and early.reason.startswith("only 5 requests reached the shadow (12 needed")
    failing = shadow_verdict(variant(12), variant(12, errors=6), shadow)
    assert failing.promote is False and failing.reason.startswith("error rate 6/12 on the new model")


RECORD = {
    "name": "ep", "url": "http://127.0.0.1:9", "model_uri": "file:///m", "version": "a" * 12, "arch": "resnet18",
    "image_size": 32, "classes": [1, 2, 3, 4, 5], "deployed_at": "2026-01-01T00:00:00+00:00", "model_ref": "g:1",
}  # fmt: skip
STRATEGY = {
    "kind": "shadow", "traffic_percent": 25, "bake_seconds": 60.0, "min_requests": 20,
    "max_error_rate_increase": 0.01, "max_latency_ratio": 1.5,
}  # fmt: skip
TEST = {
    "verdict": "wait",
    "test": "Fisher",
    "p_value": 1.0,
    "alpha": 0.05,
    "power": 0.8,
    "needed": {"new": 3, "current": 9},
}


def test_records_written_before_the_typed_fields_still_load_on_both_backends() -> None:
    """Schema 1 kept everything in ``details``, each backend in its own keys; a record read back and written again
    is the same record."""
    local = EndpointRecord.from_dict(
        {
            **RECORD,
            "schema": 1,
            "backend": "local",
            "details": {
                "router_pid": 1, "router_port": 9, "workdir": "/w", "host_url": "http://127.0.0.1:10", "host_pid": 2,
                "replicas": 1, "capture": None, "serving": {"path": "eager", "reason": "no optimized form"},
                "scaling": {"min_replicas": 1, "max_replicas": 2},
                "variants": [
                    {"id": "v1", "model_ref": "g:1", "version": "a" * 12, "weight": 100, "shadow_percent": None,
                     "replicas": 1},
                    {"id": "v2", "model_ref": "g:2", "version": "b" * 12, "weight": 0, "shadow_percent": 25,
                     "replicas": 1},
                ],
                "shadow": {"model_dir": "/m2", "version": "b" * 12, "model_uri": "file:///m2", "model_ref": "g:2",
                           "id": "v2"},
                "rollout": {"strategy": STRATEGY, "verdict": "shadowing", "reason": "copies", "steps": [
                    {"at": "2026-01-01T00:00:00+00:00", "action": "bake", "percent": 10, "verdict": "pass",
                     "reason": "ok", "metrics": {"current": {"requests": 9, "errors": 0, "error_rate": 0.0,
                                                             "p99_ms": 5.0},
                                                 "candidate": {"requests": 3, "errors": 1, "error_rate": 0.33,
                                                               "p99_ms": 6.0},
                                                 "seconds": 1.5, "test": TEST}},
                ]},
            },
        }
    )  # fmt: skip
    assert local.details == {
        "router_pid": 1, "router_port": 9, "workdir": "/w", "host_url": "http://127.0.0.1:10", "host_pid": 2
    }  # fmt: skip
    assert local.variants[1] == EndpointVariant("v2", "b" * 12, "g:2", 0, 25, 1)
    assert local.shadow == ShadowVariant(
        "v2", "file:///m2", "b" * 12, "g:2", 25, RECORD["deployed_at"], {"model_dir": "/m2"}
    )
    assert local.scaling == ScalingConfig(min_replicas=1, max_replicas=2) and local.capture is None
    assert local.rollout is not None and local.rollout.strategy == RolloutStrategy(**STRATEGY)
    (bake,) = local.rollout.steps
    assert bake.candidate == TrafficStats(3, 1, 6.0) and bake.seconds == 1.5
    assert bake.test == RolloutTest("wait", "Fisher", 1.0, 0.05, 0.8, 3, 9)
    assert EndpointRecord.from_dict(local.to_dict()) == local

    sagemaker = EndpointRecord.from_dict(
        {
            **RECORD,
            "schema": 1,
            "backend": "sagemaker",
            "details": {
                "endpoint_config": "c2", "model_name": "m1", "instance_count": 2, "scaling": None,
                "variants": [{"name": "AllTraffic", "model_version": "a" * 12, "weight": 100},
                             {"name": "Shadow", "model_version": "b" * 12, "weight": 0, "copied_percent": 25}],
                "shadow": {"model_uri": "s3://b/m2", "version": "b" * 12, "model_ref": "g:2", "model_name": "m2",
                           "variant": "Shadow", "sampling_percent": 25, "strategy": STRATEGY,
                           "started_at": "2026-01-02T00:00:00+00:00"},
                "rollout": {"strategy": STRATEGY, "verdict": "shadowing", "reason": "copies",
                            "at": "2026-01-02T00:00:00+00:00", "baseline": {"requests": 0}},
            },
        }
    )  # fmt: skip
    assert sagemaker.details == {"endpoint_config": "c2", "model_name": "m1"} and sagemaker.replicas == 2
    assert [(v.id, v.version, v.weight, v.shadow_percent) for v in sagemaker.variants] == [
        ("AllTraffic", "a" * 12, 100, None),
        ("Shadow", "b" * 12, 0, 25),
    ]
    assert sagemaker.shadow == ShadowVariant(
        "Shadow", "s3://b/m2", "b" * 12, "g:2", 25, "2026-01-02T00:00:00+00:00", {"model_name": "m2"}
    )
    assert sagemaker.rollout is not None and sagemaker.rollout.backend == {"baseline": {"requests": 0}}
    assert EndpointRecord.from_dict(sagemaker.to_dict()) == sagemaker
