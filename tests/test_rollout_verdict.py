"""The canary and shadow verdict (bincount.endpoints.judge_rollout, shadow_verdict) on constructed counts: Fisher's
exact test on errors at any sample, a pass and a latency comparison only past the minimum sample the strategy's
sensitivity asks for."""

from __future__ import annotations

import pytest

from bincount.contracts.serving import RolloutStrategy
from bincount.endpoints import judge_rollout, needed_requests, shadow_verdict
from bincount.stats import two_proportion_sample_size

CANARY = RolloutStrategy(kind="canary", traffic_percent=10, min_requests=20, max_error_rate_increase=0.01)
TEN_PERCENT = 9.0  # current-model requests per canary request


def variant(requests: int, errors: int = 0, p99_ms: float | None = 10.0) -> dict[str, float | int | None]:
    return {"requests": requests, "errors": errors, "p99_ms": p99_ms}


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
    assert check.to_dict()["needed"] == {"new": 293, "current": 2633}


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
    report = shadow_verdict(variant(12), {**variant(12), "compared": 12, "agreed": 9}, shadow)
    assert report["promote"] is True and report["agreement"] == 0.75, report
    assert report["test"]["needed"] == {"new": 12, "current": 12} and report["test"]["test"].startswith("Fisher")
    early = shadow_verdict(variant(5), variant(5), shadow)
    assert early["promote"] is False and early["reason"].startswith("only 5 requests reached the shadow (12 needed")
    failing = shadow_verdict(variant(12), variant(12, errors=6), shadow)
    assert failing["promote"] is False and failing["reason"].startswith("error rate 6/12 on the new model")
