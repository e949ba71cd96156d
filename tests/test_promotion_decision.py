"""The promotion rule (``bincount.registry.decide``) on constructed answers per image, how the nightly's run
summary shows its decision (the paired test, live accuracy, cost, nothing retrained), and which data it trains on."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prefect.logging import disable_run_logger

from bincount.config import Settings
from bincount.contracts.registry import Decision, ImagePredictions
from bincount.contracts.training import JobCost
from bincount.evaluation import Evaluation, score_counts
from bincount.feedback import FeedbackVersion, feedback_uri
from bincount.registry import decide
from bincount.storage import Storage
from flows.data import DataOptions
from flows.nightly import NightlyResult, nightly_figures, training_data
from flows.promotion import LiveAccuracy

CLASSES = [1, 2, 3, 4, 5]
IMAGES = 200
TRUTH = [1 + i % 5 for i in range(IMAGES)]
FILES = [f"{count}/image-{i:04d}.jpg" for i, count in enumerate(TRUTH)]


def scored(right: set[int], files: list[str] = FILES) -> Evaluation:
    """An evaluation of a model right on the images numbered ``right``, one count off elsewhere."""
    predicted = [count if i in right else count % 5 + 1 for i, count in enumerate(TRUTH)]
    evaluation = score_counts(TRUTH, predicted, CLASSES)
    return replace(evaluation, predictions=ImagePredictions(tuple(files), tuple(TRUTH), tuple(predicted)))


def decision(challenger: Evaluation, serving: Evaluation, margin: float = 0.0, **options: Any) -> Decision:
    return decide("bincount", challenger, "file:///m/2", serving, "file:///m/1", margin, 2, 1, **options)


def test_a_challenger_clearly_better_on_enough_images_is_promoted() -> None:
    champion = set(range(100))
    challenger = champion | set(range(100, 140))  # right on 40 more images, wrong on none the champion got
    result = decision(scored(challenger), scored(champion))
    assert result.promoted and result.comparison is not None and result.comparison.verdict == "better"
    assert (result.comparison.mcnemar.only_b, result.comparison.mcnemar.only_a) == (40, 0)
    assert result.reason.startswith("challenger better: +20.0 points") and "exact McNemar p=" in result.reason
    assert (result.challenger_score, result.serving_score, result.confidence) == (0.7, 0.5, 0.95)


def test_a_gap_within_the_noise_cannot_be_told_and_keeps_the_champion() -> None:
    champion = set(range(100))
    challenger = (champion - {0, 1, 2}) | {100, 101, 102, 103, 104}  # 5 against 3 discordant images
    result = decision(scored(challenger), scored(champion))
    assert not result.promoted and result.comparison is not None and result.comparison.verdict == "cannot tell"
    more = result.comparison.more_images
    assert more is not None and more > 0
    assert result.reason.startswith("inconclusive, the serving model stays: cannot tell: +1.0 points")
    assert f"about {more} more test images would decide a gap of 1.0 points" in result.reason


def test_the_margin_is_a_minimum_gain_on_top_of_the_test() -> None:
    champion = set(range(100))
    challenger = champion | set(range(100, 120))  # +10 points: better by the test, less than a margin of 15
    assert decision(scored(challenger), scored(champion)).promoted
    held_back = decision(scored(challenger), scored(champion), margin=0.15)
    assert not held_back.promoted and "better by less than the margin of 15.0 points" in held_back.reason


def test_a_lower_confidence_promotes_a_smaller_gain() -> None:
    champion = set(range(100))
    challenger = champion | set(range(100, 107))  # 7 against 0: p = 0.016
    assert not decision(scored(challenger), scored(champion), confidence=0.99).promoted
    assert decision(scored(challenger), scored(champion), confidence=0.95).promoted


def test_a_worse_challenger_is_kept_out() -> None:
    result = decision(scored(set(range(50))), scored(set(range(100))))
    assert not result.promoted and result.comparison is not None and result.comparison.verdict == "worse"
    assert result.reason.endswith("the serving model stays")


def test_nothing_serving_promotes_without_a_comparison() -> None:
    result = decide("bincount", scored(set(range(30))), "file:///m/1", None, None, 0.01)
    assert result.promoted and result.comparison is None and result.reason == "no model serves this endpoint yet"


def test_scores_of_other_images_or_without_answers_are_refused() -> None:
    other = [file.replace("image", "other") for file in FILES]
    with pytest.raises(ValueError, match=r"not scored on the same test images .*score both on the challenger's"):
        decision(scored(set()), scored(set(), other))
    without = replace(scored(set()), predictions=None)
    with pytest.raises(ValueError, match="serving model's evaluation has no answer per test image"):
        decision(scored(set()), without)


def test_the_nightly_summary_shows_the_paired_test_live_accuracy_and_cost() -> None:
    champion = set(range(100))
    result = decision(scored(champion | set(range(100, 140))), scored(champion)).with_outcome("promoted")
    live = LiveAccuracy(accuracy=0.61, labelled=120, model_version="bincount:1", window_end="2026-12-07T02:00:00Z")
    cost = JobCost(billed_s=204.0, unit="cpu-seconds")
    figures = nightly_figures(NightlyResult(decision=result, live=live, training_cost=cost))
    assert figures["challenger"] == "bincount:2, test accuracy 0.7"
    assert figures["paired test"] == (
        "better: exact McNemar p=1.82e-12 on 200 images; discordant: 40 only the challenger right, 0 only the "
        "serving model right"
    )
    assert figures["accuracy gain (95% interval)"].startswith("+20.0 points [")
    assert figures["serving live accuracy"] == "0.61 on 120 labelled requests to bincount:1 up to 2026-12-07T02:00:00Z"
    assert figures["training cost"] == "3.4 CPU minutes (local)"


def test_the_nightly_summary_says_nothing_was_retrained() -> None:
    unchanged = Decision(
        endpoint_name="bincount",
        promoted=False,
        reason="no new data and no new code: nothing retrained",
        metric="accuracy",
        challenger_score=0.509,
        serving_score=0.509,
        margin=0.01,
        challenger_model_uri="file:///m/1",
        serving_model_uri="file:///m/1",
        serving_version=1,
        outcome="unchanged",
    )
    figures = nightly_figures(NightlyResult(decision=unchanged))
    assert figures["challenger"] == "nothing retrained" and figures["training cost"] == "nothing trained"
    assert "challenger (none)" not in str(figures), figures
    assert figures["serving live accuracy"].startswith("none: no labelled traffic")


def test_the_nightly_trains_on_the_datasets_latest_manifest_unless_data_is_given(tmp_path: Path) -> None:
    settings = Settings.load(artifact_root=tmp_path.as_uri(), source_uri=(tmp_path / "source").as_uri())
    recorded = DataOptions(dataset="demo")
    with disable_run_logger():
        assert training_data(settings, recorded, given=False) == (recorded, settings), "nothing harvested yet"
        feedback = feedback_uri(settings.artifact_root, "demo", "source")
        version = FeedbackVersion(
            dataset="demo",
            version=2,
            manifest_uri=f"{feedback}/manifests/000002.json",
            source_uri=feedback,
            created_at="2026-12-07T01:30:00+00:00",
            images=612,
            previous_manifest_uri=None,
            base_manifest_uri=f"{settings.source_uri}/file_list.json",
            added=[],
            mirrored=0,
            not_in_base=[],
        )
        Storage().write_bytes(
            feedback_uri(settings.artifact_root, "demo", "manifests", "000002.lineage.json"), version.to_json()
        )
        data, trained_from = training_data(settings, recorded, given=False)
        assert (data.manifest_uri, trained_from.source_uri) == (version.manifest_uri, feedback)
        assert training_data(settings, recorded, given=True) == (recorded, settings), "data given still wins"
