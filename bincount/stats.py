"""The statistics behind the project's decisions: champion against challenger, int8 against eager, canary against
the current model. Each answers with its test, its numbers and, where the data cannot decide, "cannot tell".

    paired (the same images, two models)  mcnemar_exact            exact McNemar on who alone got an image right
                                          paired_bootstrap         intervals for accuracy, RMSE and within-one
                                          mcnemar_sample_size      how many images would decide a gap
                                          compare_paired           all three, as one verdict and one sentence
    one model                             bootstrap_scores         its accuracy, RMSE and within-one with intervals
    two arms (different requests)         error_rate_test          Fisher's exact test on error counts
                                          two_proportion_sample_size   requests per arm to see a given increase

Plain Python and numpy; it imports nothing of the project, so every layer may use it (import-linter puts it
below ``contracts``). Exact tests are sums of binomial and hypergeometric terms, so small counts (a canary's
two errors, a test side's 57 images) get exact p-values rather than a normal approximation's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

Verdict = Literal["better", "worse", "cannot tell"]
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
POWER = 0.8  # the chance a sample size is chosen to give of seeing the effect it is sized for
_NORMAL = NormalDist()
_CELLS_PER_CHUNK = 2_000_000  # bootstrap indexes drawn at once (16 MB), whatever the number of images


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), summed exactly in integers."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two models on the same images: ``only_a`` images only A got right, ``only_b`` only B.

    With no difference between the models each of the ``only_a + only_b`` discordant images is A's or B's
    with probability 1/2, so the counts are Binomial(n, 1/2); images both got right or both wrong say nothing.
    """

    only_a: int
    only_b: int
    p_value: float  # two-sided
    p_a_better: float  # one-sided: P(X >= only_a)
    p_b_better: float  # one-sided: P(X >= only_b)


def mcnemar_exact(only_a: int, only_b: int) -> McNemar:
    """The exact McNemar test for ``only_a`` and ``only_b`` discordant images (b and c in the usual table)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    n = only_a + only_b
    two_sided = min(1.0, 2 * _binomial_half_cdf(min(only_a, only_b), n))
    # P(X >= a) = P(n - X <= n - a) = P(X <= b): the binomial with p = 1/2 is symmetric
    return McNemar(only_a, only_b, two_sided, _binomial_half_cdf(only_b, n), _binomial_half_cdf(only_a, n))


@dataclass(frozen=True)
class Interval:
    """A point estimate and its interval."""

    estimate: float
    low: float
    high: float

    def points(self) -> str:
        """As percentage points: ``+4.1 points [1.2, 7.0]``."""
        return f"{100 * self.estimate:+.1f} points [{100 * self.low:.1f}, {100 * self.high:.1f}]"

    def counts(self) -> str:
        """In the metric's own unit (RMSE: counts): ``-0.05 [-0.10, 0.01]``."""
        return f"{self.estimate:+.2f} [{self.low:.2f}, {self.high:.2f}]"


@dataclass(frozen=True)
class Metrics:
    """One model's scores on a set of images: accuracy, RMSE of the count and within-one (|error| <= 1)."""

    accuracy: float
    rmse: float
    within_one: float


def scores(truth: Sequence[int] | np.ndarray, predicted: Sequence[int] | np.ndarray) -> Metrics:
    errors = np.asarray(predicted, dtype=float) - np.asarray(truth, dtype=float)
    return Metrics(
        accuracy=float(np.mean(errors == 0)),
        rmse=float(np.sqrt(np.mean(errors**2))),
        within_one=float(np.mean(np.abs(errors) <= 1)),
    )


@dataclass(frozen=True)
class PairedDifferences:
    """B minus A on the same images, each with its percentile interval from a paired bootstrap: resampling
    images (each keeps both models' answers) keeps the correlation between the models that a paired test uses."""

    accuracy: Interval
    rmse: Interval  # negative: B's count errors are smaller
    within_one: Interval
    confidence: float
    resamples: int
    seed: int


def _checked(truth: Any, *predictions: Any) -> tuple[np.ndarray, ...]:
    arrays = tuple(np.asarray(values, dtype=float) for values in (truth, *predictions))
    lengths = {len(array) for array in arrays}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"the truth and each model's predictions must be as long, and not empty: lengths {lengths}")
    return arrays


def paired_bootstrap(
    truth: Sequence[int] | np.ndarray,
    predicted_a: Sequence[int] | np.ndarray,
    predicted_b: Sequence[int] | np.ndarray,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> PairedDifferences:
    """Intervals for B's accuracy, RMSE and within-one minus A's, from ``resamples`` resamples of the images
    (seeded: the same inputs give the same intervals)."""
    y, a, b = _checked(truth, predicted_a, predicted_b)
    hits = (b == y).astype(float) - (a == y)
    near = (np.abs(b - y) <= 1).astype(float) - (np.abs(a - y) <= 1)
    squares_a, squares_b = (a - y) ** 2, (b - y) ** 2
    rng = np.random.default_rng(seed)
    accuracy, rmse, within = [], [], []
    chunk = max(1, _CELLS_PER_CHUNK // len(y))
    for start in range(0, resamples, chunk):
        rows = rng.integers(0, len(y), size=(min(chunk, resamples - start), len(y)))
        accuracy.append(hits[rows].mean(axis=1))
        rmse.append(np.sqrt(squares_b[rows].mean(axis=1)) - np.sqrt(squares_a[rows].mean(axis=1)))
        within.append(near[rows].mean(axis=1))
    tails = [(1 - confidence) / 2, 1 - (1 - confidence) / 2]

    def interval(estimate: float, draws: list[np.ndarray]) -> Interval:
        low, high = np.quantile(np.concatenate(draws), tails)
        return Interval(float(estimate), float(low), float(high))

    return PairedDifferences(
        accuracy=interval(hits.mean(), accuracy),
        rmse=interval(np.sqrt(squares_b.mean()) - np.sqrt(squares_a.mean()), rmse),
        within_one=interval(near.mean(), within),
        confidence=confidence,
        resamples=resamples,
        seed=seed,
    )


@dataclass(frozen=True)
class ScoreIntervals:
    """One model's accuracy, RMSE and within-one on a set of images, each with its percentile bootstrap interval."""

    accuracy: Interval
    rmse: Interval
    within_one: Interval
    confidence: float
    resamples: int
    seed: int


def bootstrap_scores(
    truth: Sequence[int] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> ScoreIntervals:
    """One model's scores with intervals from ``resamples`` resamples of the images (seeded): the figures a model
    has on its own, where there is no champion to pair it with."""
    y, p = _checked(truth, predicted)
    hits, near, squares = (p == y).astype(float), (np.abs(p - y) <= 1).astype(float), (p - y) ** 2
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {"accuracy": [], "rmse": [], "within_one": []}
    chunk = max(1, _CELLS_PER_CHUNK // len(y))
    for start in range(0, resamples, chunk):
        rows = rng.integers(0, len(y), size=(min(chunk, resamples - start), len(y)))
        draws["accuracy"].append(hits[rows].mean(axis=1))
        draws["rmse"].append(np.sqrt(squares[rows].mean(axis=1)))
        draws["within_one"].append(near[rows].mean(axis=1))
    plain = {"accuracy": hits.mean(), "rmse": np.sqrt(squares.mean()), "within_one": near.mean()}
    tails = [(1 - confidence) / 2, 1 - (1 - confidence) / 2]
    intervals = {
        name: Interval(float(plain[name]), *(float(q) for q in np.quantile(np.concatenate(values), tails)))
        for name, values in draws.items()
    }
    return ScoreIntervals(**intervals, confidence=confidence, resamples=resamples, seed=seed)


def mcnemar_sample_size(discordant_rate: float, gap: float, alpha: float = 0.05, power: float = POWER) -> int | None:
    """Images a two-sided McNemar test at ``alpha`` needs to see an accuracy ``gap`` with probability ``power``,
    when a share ``discordant_rate`` of images is right for one model only (Connor 1987's normal approximation).
    None for a gap of 0: no number of images decides it."""
    if gap == 0:
        return None
    if not abs(gap) <= discordant_rate <= 1:
        raise ValueError(f"a gap of {gap} needs at least as many discordant images (rate {discordant_rate})")
    z_alpha, z_power = _NORMAL.inv_cdf(1 - alpha / 2), _NORMAL.inv_cdf(power)
    root = z_alpha * math.sqrt(discordant_rate) + z_power * math.sqrt(discordant_rate - gap**2)
    return math.ceil(root**2 / gap**2)


@dataclass(frozen=True)
class NonInferiority:
    """How much worse than the champion the challenger may be on the secondary metrics before that counts
    against it: its RMSE higher by at most ``rmse`` (in counts), its within-one lower by at most ``within_one``."""

    rmse: float = 0.1
    within_one: float = 0.02


@dataclass(frozen=True)
class PairedComparison:
    """Champion against challenger on the same images. ``verdict``: "better" (promote: accuracy better with
    confidence by at least ``margin``, RMSE and within-one not worse beyond their margins), "worse" (accuracy
    worse with confidence, or a secondary metric worse beyond its margin with confidence), or "cannot tell"."""

    verdict: Verdict
    sentence: str
    images: int
    confidence: float
    mcnemar: McNemar  # only_a: the champion alone right, only_b: the challenger alone right
    differences: PairedDifferences  # challenger minus champion
    champion: Metrics
    challenger: Metrics
    margin: float
    non_inferiority: NonInferiority = field(default_factory=NonInferiority)
    more_images: int | None = None  # undecided accuracy: about this many more images would decide its gap
    test: str = "exact McNemar (two-sided) on per-image correctness; paired bootstrap intervals"

    @property
    def p_value(self) -> float:
        return self.mcnemar.p_value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_paired(
    truth: Sequence[int] | np.ndarray,
    champion_pred: Sequence[int] | np.ndarray,
    challenger_pred: Sequence[int] | np.ndarray,
    confidence: float = 0.95,
    non_inferiority: NonInferiority | None = None,
    margin: float = 0.0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> PairedComparison:
    """Compare two models' predicted counts on the same images (``truth``: the true counts).

    Accuracy is the primary metric: the challenger is better when the exact McNemar test rejects "no
    difference" at ``1 - confidence`` with the challenger ahead, the bootstrap interval of the gain lies above 0,
    and the gain is at least ``margin`` (a minimum effect size on top of the test). RMSE and within-one are
    checked for non-inferiority with their bootstrap intervals. When accuracy is undecided the record says
    about how many more images would decide the gap seen (at power 0.8).

    Example:
        >>> result = compare_paired(truth, champion_counts, challenger_counts, margin=0.01)
        >>> result.verdict, result.sentence
    """
    y, champion_counts, challenger_counts = _checked(truth, champion_pred, challenger_pred)
    rules = non_inferiority or NonInferiority()
    alpha = 1 - confidence
    champion_hits, challenger_hits = champion_counts == y, challenger_counts == y
    test = mcnemar_exact(int(np.sum(champion_hits & ~challenger_hits)), int(np.sum(challenger_hits & ~champion_hits)))
    diff = paired_bootstrap(y, champion_counts, challenger_counts, confidence, resamples, seed)
    significant = test.p_value < alpha
    accuracy_better = significant and test.only_b > test.only_a and diff.accuracy.low > 0
    accuracy_worse = significant and test.only_a > test.only_b and diff.accuracy.high < 0
    rmse_worse, rmse_within = diff.rmse.low > rules.rmse, diff.rmse.high <= rules.rmse
    near_worse, near_within = diff.within_one.high < -rules.within_one, diff.within_one.low >= -rules.within_one
    evidence = (
        f"{diff.accuracy.points()} ({100 * confidence:.0f}% paired bootstrap, {len(y)} images), exact McNemar "
        f"p={test.p_value:.3g}, {test.only_b} vs {test.only_a} discordant (challenger vs champion)"
    )
    more: int | None = None
    verdict: Verdict = "cannot tell"
    if accuracy_worse:
        verdict, sentence = "worse", f"challenger worse: {evidence}"
    elif rmse_worse or near_worse:
        worse = f"RMSE {diff.rmse.counts()} (at most +{rules.rmse:.2f})" if rmse_worse else ""
        worse = worse or f"within-one {diff.within_one.points()} (at most -{100 * rules.within_one:.1f})"
        verdict, sentence = "worse", f"challenger worse: {worse}; accuracy {evidence}"
    elif accuracy_better and diff.accuracy.estimate < margin:
        sentence = f"cannot tell: better by less than the margin of {100 * margin:.1f} points: {evidence}"
    elif accuracy_better and not (rmse_within and near_within):
        unshown = f"RMSE {diff.rmse.counts()}" if not rmse_within else f"within-one {diff.within_one.points()}"
        sentence = f"cannot tell: accuracy better, {evidence}; but {unshown} is not shown within its margin"
    elif accuracy_better:
        verdict, sentence = "better", f"challenger better: {evidence}; RMSE and within-one within their margins"
    else:
        gap = diff.accuracy.estimate
        needed = mcnemar_sample_size((test.only_a + test.only_b) / len(y), gap, alpha)
        if needed is None:
            decide = "both models get as many images right: no number of images would decide a gap of 0"
        else:
            more = max(needed - len(y), 0)
            decide = f"about {more} more test images would decide a gap of {100 * abs(gap):.1f} points"
        sentence = f"cannot tell: {evidence}; {decide}"
    return PairedComparison(
        verdict=verdict,
        sentence=sentence,
        images=len(y),
        confidence=confidence,
        mcnemar=test,
        differences=diff,
        champion=scores(y, champion_counts),
        challenger=scores(y, challenger_counts),
        margin=margin,
        non_inferiority=rules,
        more_images=more,
    )


@dataclass(frozen=True)
class ErrorRateTest:
    """Whether the new arm's error rate is higher than the current one's: Fisher's exact test, one-sided.

    Given the errors of both arms together, the new arm's share of them is hypergeometric under "the same
    rate"; ``p_value`` is the chance of the new arm getting at least as many as it did.
    """

    errors_current: int
    requests_current: int
    errors_new: int
    requests_new: int
    p_value: float
    test: str = "Fisher's exact test, one-sided"

    def counts(self) -> str:
        return (
            f"error rate {self.errors_new}/{self.requests_new} on the new model against "
            f"{self.errors_current}/{self.requests_current} on the current one"
        )


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def error_rate_test(errors_current: int, requests_current: int, errors_new: int, requests_new: int) -> ErrorRateTest:
    """Fisher's exact test, one-sided, of the new arm's error rate against the current arm's."""
    for errors, requests in ((errors_current, requests_current), (errors_new, requests_new)):
        if not 0 <= errors <= requests:
            raise ValueError(f"{errors} errors in {requests} requests: errors must be between 0 and the requests")
    total, errors = requests_current + requests_new, errors_current + errors_new
    whole = _log_comb(total, requests_new)
    logs = [
        _log_comb(errors, k) + _log_comb(total - errors, requests_new - k) - whole
        for k in range(errors_new, min(errors, requests_new) + 1)
    ]
    p_value = min(1.0, sum(math.exp(term) for term in logs))
    return ErrorRateTest(errors_current, requests_current, errors_new, requests_new, p_value)


def two_proportion_sample_size(
    baseline: float, increase: float, alpha: float = 0.05, power: float = POWER, ratio: float = 1.0
) -> tuple[int, int]:
    """Requests on the new arm and on the current arm (``ratio`` times as many) for a one-sided test at ``alpha``
    to see an error rate of ``baseline + increase`` against ``baseline`` with probability ``power``.

    Fleiss, Levin and Paik's formula for unequal arms with their continuity correction, which sizes for an
    exact test: without it, a baseline of 0 and an increase of 1 point gives 615 per arm, where Fisher's test
    then sees the increase only 73% of the time; with it, 802 per arm, 90%.
    """
    if not 0 < increase <= 1 - baseline or baseline < 0:
        raise ValueError(f"an increase of {increase} on a rate of {baseline} must be > 0 and end at most at 1")
    if ratio <= 0:
        raise ValueError(f"the arms' ratio {ratio} must be positive")
    new, current = baseline + increase, baseline
    pooled = (new + ratio * current) / (1 + ratio)
    z_alpha, z_power = _NORMAL.inv_cdf(1 - alpha), _NORMAL.inv_cdf(power)
    root = z_alpha * math.sqrt((ratio + 1) * pooled * (1 - pooled)) + z_power * math.sqrt(
        ratio * new * (1 - new) + current * (1 - current)
    )
    plain = root**2 / (ratio * increase**2)
    corrected = plain / 4 * (1 + math.sqrt(1 + 2 * (ratio + 1) / (ratio * plain * increase))) ** 2
    return math.ceil(corrected), math.ceil(ratio * corrected)
