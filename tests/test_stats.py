"""bincount.stats against values computed by hand: exact McNemar, the paired bootstrap, Fisher's exact test, the
sample sizes, and compare_paired's verdicts on constructed pairs of models."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from bincount.stats import (
    NonInferiority,
    bootstrap_scores,
    compare_paired,
    error_rate_test,
    mcnemar_exact,
    mcnemar_sample_size,
    paired_bootstrap,
    scores,
    two_proportion_sample_size,
)


def away(truth: np.ndarray, off: int) -> np.ndarray:
    """Counts ``off`` away from ``truth``, inside 1..5."""
    return np.where(truth + off <= 5, truth + off, truth - off)


def paired_counts(
    both_right: int, only_champion: int, only_challenger: int, both_wrong: int, off: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True counts and two models' predictions with this 2x2 table of per-image correctness: the champion's
    misses are one count off, the challenger's ``off`` counts."""
    n = both_right + only_champion + only_challenger + both_wrong
    truth = np.array([1 + i % 5 for i in range(n)])
    champion, challenger = truth.copy(), truth.copy()
    right, champion_only, challenger_only = np.cumsum([both_right, only_champion, only_challenger])
    champion[champion_only:] = away(truth, 1)[champion_only:]  # only the challenger right, and both wrong
    challenger[right:champion_only] = away(truth, off)[right:champion_only]
    challenger[challenger_only:] = away(truth, off)[challenger_only:]
    return truth, champion, challenger


def test_exact_mcnemar_for_10_against_2_is_the_binomial_tail_by_hand() -> None:
    # X ~ Binomial(12, 1/2): P(X <= 2) = (1 + 12 + 66) / 2**12
    test = mcnemar_exact(10, 2)
    assert test.p_a_better == 79 / 4096
    assert test.p_value == 2 * 79 / 4096
    assert test.p_b_better == 1 - 13 / 4096  # P(X >= 2) = 1 - P(X <= 1)
    assert mcnemar_exact(2, 10).p_b_better == 79 / 4096


def test_exact_mcnemar_with_no_discordant_image_says_nothing() -> None:
    test = mcnemar_exact(0, 0)
    assert (test.p_value, test.p_a_better, test.p_b_better) == (1.0, 1.0, 1.0)
    assert mcnemar_exact(6, 6).p_value == 1.0  # capped: twice a tail that holds the middle
    with pytest.raises(ValueError, match="must be >= 0"):
        mcnemar_exact(-1, 3)


def test_a_bootstrap_of_identical_models_is_a_zero_width_interval_at_zero() -> None:
    truth, champion, _ = paired_counts(300, 0, 0, 200)
    diff = paired_bootstrap(truth, champion, champion)
    for interval in (diff.accuracy, diff.rmse, diff.within_one):
        assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_the_bootstrap_is_seeded_and_its_estimates_are_the_plain_differences() -> None:
    truth, champion, challenger = paired_counts(250, 40, 60, 150)
    first, again = paired_bootstrap(truth, champion, challenger), paired_bootstrap(truth, champion, challenger)
    assert first == again, "the same inputs and seed give the same intervals"
    other = paired_bootstrap(truth, champion, challenger, seed=1)
    assert other.accuracy != first.accuracy
    a, b = scores(truth, champion), scores(truth, challenger)
    assert first.accuracy.estimate == pytest.approx(b.accuracy - a.accuracy) == pytest.approx(20 / 500)
    assert first.rmse.estimate == pytest.approx(b.rmse - a.rmse)
    assert first.accuracy.low < first.accuracy.estimate < first.accuracy.high
    # the paired standard error: sqrt((b + c) / n - gap**2) / sqrt(n); a 95% interval is about +-1.96 of it
    se = math.sqrt(100 / 500 - (20 / 500) ** 2) / math.sqrt(500)
    assert first.accuracy.high - first.accuracy.low == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_one_models_bootstrap_is_seeded_and_centred_on_its_plain_scores() -> None:
    truth, _, challenger = paired_counts(150, 0, 100, 250, off=2)  # right on 250 of 500, the misses 2 off
    first = bootstrap_scores(truth, challenger)
    assert first == bootstrap_scores(truth, challenger), "the same inputs and seed give the same intervals"
    plain = scores(truth, challenger)
    assert (first.accuracy.estimate, first.rmse.estimate) == (plain.accuracy, pytest.approx(plain.rmse))
    assert first.within_one.estimate == plain.within_one == 0.5
    # a proportion's standard error: sqrt(p (1 - p) / n); a 95% interval is about +-1.96 of it
    se = math.sqrt(0.5 * 0.5 / 500)
    assert first.accuracy.high - first.accuracy.low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert first.rmse.estimate == pytest.approx(math.sqrt(2))  # half the images 2 off
    assert first.rmse.low < first.rmse.estimate < first.rmse.high
    perfect = bootstrap_scores(truth, truth)
    assert (perfect.accuracy.low, perfect.rmse.high) == (1.0, 0.0)


def test_a_clearly_better_challenger_on_500_images_is_better() -> None:
    truth, champion, challenger = paired_counts(250, 25, 100, 125)  # 55% against 70%
    result = compare_paired(truth, champion, challenger, margin=0.01)
    assert result.verdict == "better", result.sentence
    assert (result.mcnemar.only_a, result.mcnemar.only_b) == (25, 100)
    assert result.p_value == mcnemar_exact(25, 100).p_value < 1e-10
    assert result.champion.accuracy == 0.55 and result.challenger.accuracy == 0.70
    assert re.fullmatch(
        r"challenger better: \+15\.0 points \[\d+\.\d, \d+\.\d\] \(95% paired bootstrap, 500 images\), exact McNemar "
        r"p=[\d.e-]+, 100 vs 25 discordant \(challenger vs champion\); RMSE and within-one within their margins",
        result.sentence,
    ), result.sentence
    assert result.to_dict()["mcnemar"]["only_b"] == 100 and result.more_images is None


def test_a_clearly_worse_challenger_is_worse() -> None:
    truth, champion, challenger = paired_counts(250, 100, 25, 125)
    result = compare_paired(truth, champion, challenger)
    assert result.verdict == "worse" and result.sentence.startswith("challenger worse: -15.0 points"), result.sentence


def test_two_models_of_equal_accuracy_with_many_discordances_cannot_be_told_apart() -> None:
    truth, champion, challenger = paired_counts(300, 60, 60, 80)
    result = compare_paired(truth, champion, challenger)
    assert result.verdict == "cannot tell" and result.p_value == 1.0
    assert result.differences.accuracy.low < 0 < result.differences.accuracy.high
    assert result.more_images is None
    assert result.sentence.endswith("no number of images would decide a gap of 0"), result.sentence


def test_a_small_gap_cannot_be_told_and_the_sentence_says_how_many_more_images_would_decide_it() -> None:
    truth, champion, challenger = paired_counts(300, 55, 65, 80)  # +2 points, 120 discordant of 500
    result = compare_paired(truth, champion, challenger)
    assert result.verdict == "cannot tell" and result.p_value > 0.05
    needed = mcnemar_sample_size(120 / 500, 10 / 500)
    assert result.more_images == needed - 500
    assert f"about {needed - 500} more test images would decide a gap of 2.0 points" in result.sentence


def test_the_mcnemar_sample_size_is_connors_formula() -> None:
    # discordant share 0.2, gap 2 points, two-sided 5%, power 0.8: (1.95996 * sqrt(0.2) + 0.84162 * sqrt(0.1996))^2
    # / 0.02^2 = 3922.08, rounded up
    assert mcnemar_sample_size(0.2, 0.02) == 3923
    assert mcnemar_sample_size(0.2, -0.02) == 3923, "a gap either way"
    assert mcnemar_sample_size(0.2, 0.0) is None
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_sample_size(0.01, 0.02)


def test_a_significant_gain_below_the_margin_keeps_the_champion() -> None:
    truth, champion, challenger = paired_counts(250, 25, 100, 125)
    result = compare_paired(truth, champion, challenger, margin=0.2)
    assert result.verdict == "cannot tell"
    assert result.sentence.startswith("cannot tell: better by less than the margin of 20.0 points"), result.sentence


def test_a_more_accurate_challenger_whose_misses_are_far_off_is_worse_on_rmse() -> None:
    truth, champion, challenger = paired_counts(250, 25, 100, 125, off=2)
    result = compare_paired(truth, champion, challenger)
    assert result.differences.accuracy.low > 0 and result.differences.rmse.low > 0.1
    assert result.verdict == "worse" and result.sentence.startswith("challenger worse: RMSE +"), result.sentence


def test_a_more_accurate_challenger_whose_rmse_is_not_shown_within_its_margin_cannot_be_told() -> None:
    truth, champion, challenger = paired_counts(250, 25, 100, 125)
    wrong = np.flatnonzero(challenger != truth)[:30]  # 30 of its 150 misses two counts off instead of one
    challenger[wrong] = away(truth[wrong], 2)
    result = compare_paired(truth, champion, challenger, non_inferiority=NonInferiority(rmse=0.01, within_one=0.2))
    assert result.differences.rmse.low < 0.01 < result.differences.rmse.high, result.differences.rmse
    assert result.verdict == "cannot tell" and "not shown within its margin" in result.sentence, result.sentence


def test_inputs_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="as long"):
        compare_paired([1, 2, 3], [1, 2], [1, 2, 3])


def test_fishers_exact_test_by_hand() -> None:
    # 3 errors in 3 requests against 0 in 3: all 3 errors fell on the new arm, 1 way in C(6, 3) = 20
    assert error_rate_test(0, 3, 3, 3).p_value == pytest.approx(1 / 20)
    # 2 of 20 against 0 of 20: C(20, 2) / C(40, 2)
    assert error_rate_test(0, 20, 2, 20).p_value == pytest.approx(190 / 780)
    assert error_rate_test(5, 100, 0, 100).p_value == 1.0, "no errors on the new arm: not higher"
    assert error_rate_test(0, 0, 0, 0).p_value == 1.0
    with pytest.raises(ValueError, match="between 0 and the requests"):
        error_rate_test(0, 10, 11, 10)


def fisher_power(requests: int, rate: float, alpha: float = 0.05) -> float:
    """The exact chance that Fisher's test flags ``rate`` on ``requests`` against a clean arm of as many."""
    tail = 0.0
    for errors in range(requests + 1):
        chance = math.comb(requests, errors) * rate**errors * (1 - rate) ** (requests - errors)
        if error_rate_test(0, requests, errors, requests).p_value < alpha:
            tail += chance
        if errors > 60:
            break
    return tail


def test_the_two_proportion_sample_size_gives_fishers_test_its_power() -> None:
    """Fleiss' continuity-corrected size for +1 point on a clean baseline: Fisher's test at that size sees the
    increase at least 80% of the time, and at the uncorrected formula's 615 it would not."""
    new, current = two_proportion_sample_size(0.0, 0.01)
    assert (new, current) == (802, 802)
    assert fisher_power(new, 0.01) >= 0.8 > fisher_power(615, 0.01)


def test_unequal_arms_need_fewer_requests_on_the_small_one_and_more_overall() -> None:
    even, _ = two_proportion_sample_size(0.0, 0.01)
    new, current = two_proportion_sample_size(0.0, 0.01, ratio=9)  # a 10% canary
    assert new < even and 9 * (new - 1) < current <= 9 * new and new + current > 2 * even
    assert two_proportion_sample_size(0.0, 0.5)[0] < two_proportion_sample_size(0.0, 0.1)[0] < even
    with pytest.raises(ValueError, match="must be > 0"):
        two_proportion_sample_size(0.0, 0.0)
