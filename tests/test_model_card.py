"""The model card: built from two tiny untrained models on the demo channels, its figures checked against
predictions computed here on their own, stored with a version, and opened in a real browser as a Prefect artifact."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from test_deployments import CHROMIUM, PAGE, rendered

from bincount.contracts.registry import DatasetRef, ModelMetrics, ModelVersion, ModelVersionSpec
from bincount.demo_data import write_demo_channels
from bincount.evaluation import predict_counts
from bincount.model_card import ModelCard, ModelCardError, build_model_card, reliability, write_model_card
from bincount.models import write_untrained_model_dir
from bincount.storage import Storage
from sm_scripts.data import load_channel
from sm_scripts.model_dir import INFO_FILE, read_model_info

CHALLENGER_PX, CHAMPION_PX = 64, 48  # each model reads the photos at its own size, and its maps are that size
SECTIONS = (
    "# Model card: bincount:3",
    "## Lineage",
    "## Data",
    "## Recipe",
    "## Metrics on",
    "## Per count",
    "## Confusion matrices",
    "## Calibration",
    "## int8 parity",
    "## Where they disagree",
)
DATA_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")


def version(split_uri: str) -> ModelVersion:
    spec = ModelVersionSpec(
        model_uri="file:///artifacts/jobs/job-7/output/model.tar.gz",
        model_sha256="a" * 64,
        metrics=ModelMetrics(0.2, 1.5, 0.6, {}),
        dataset=DatasetRef(split_uri, "b" * 64, {"train": 40, "valid": 40, "test": 40}),
        code_hash="c0de1234",
        hyperparameters={"arch": "resnet18", "epochs": 1, "lr": 0.01},
        training_job="bincount-train-job-7",
        flow_run_id="run-7",
        flow_run_url="http://127.0.0.1:4200/runs/flow-run/run-7",
        recipe={"image_size": CHALLENGER_PX},
    )
    return ModelVersion("bincount", 3, spec, "2026-12-07T18:00:00+00:00")


def counts_as_served(model_dir: Path, channel: Path) -> dict[str, int]:
    """Each test photo's count as the model serves it (the pipeline's own scoring), by its file in the channel."""
    info = read_model_info(model_dir)
    cache = load_channel(channel, [str(c) for c in info["classes"]], info["image_size"], torch.get_num_threads())
    files = [str(Path(f).relative_to(channel)) for f in cache.files]
    return dict(zip(files, predict_counts(model_dir, cache), strict=True))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("card-models")
    return {
        "challenger": write_untrained_model_dir(root / "challenger", "resnet18", CHALLENGER_PX, seed=1),
        "champion": write_untrained_model_dir(root / "champion", "efficientnet_lite0", CHAMPION_PX, seed=2),
    }


@pytest.fixture(scope="module")
def split_uri(tmp_path_factory: pytest.TempPathFactory, demo_channels: dict[str, Path]) -> str:
    """The demo channels' split manifest, as the pipeline writes it (id, label, split, uri, sha256)."""
    rows = [
        {"id": path.stem, "label": int(path.parent.name), "split": side, "uri": path.as_uri(), "sha256": "0" * 64}
        for side, channel in demo_channels.items()
        for path in sorted(channel.glob("*/*.jpg"))
    ]
    path = tmp_path_factory.mktemp("dataset") / "split.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path.as_uri()


@pytest.fixture(scope="module")
def card(models: dict[str, Path], demo_channels: dict[str, Path], split_uri: str) -> ModelCard:
    return build_model_card(
        models["challenger"],
        demo_channels["test"],
        version(split_uri),
        models["champion"],
        champion_name="bincount:2",
        storage=Storage(),
    )


def test_the_card_has_every_section_with_its_figures(card: ModelCard) -> None:
    page = card.markdown
    positions = [page.index(section) for section in SECTIONS]
    assert positions == sorted(positions), "the sections come in order"
    for figure in ("a" * 64, "b" * 64, "c0de1234", "bincount-train-job-7", "run-7", "job-7/output/model.tar.gz"):
        assert figure in page, figure
    assert card.data.sides == {"train": 40, "valid": 40, "test": 40}
    assert card.data.class_balance == {side: {str(c): 8 for c in range(1, 6)} for side in ("test", "train", "valid")}
    assert card.recipe["hyperparameters"]["lr"] == 0.01 and "train.py `--lr`" in page
    assert card.recipe["network"]["image_size"] == CHALLENGER_PX
    assert card.comparison is not None and card.comparison.sentence in page
    assert card.champion is not None and card.champion.name == "bincount:2"
    for scores in (card.challenger, card.champion):
        for interval in (scores.accuracy, scores.rmse, scores.within_one):
            assert interval.low <= interval.estimate <= interval.high
    assert card.comparison.challenger.accuracy == card.challenger.accuracy.estimate
    change = np.asarray(card.challenger.confusion) - np.asarray(card.champion.confusion)
    assert card.confusion_change == change.tolist()
    for count, delta in card.per_class_delta.items():
        assert delta == card.challenger.per_class_accuracy[count] - card.champion.per_class_accuracy[count]
    assert set(card.calibration) == {"challenger", "champion"}
    assert "no optimized form" in page
    assert len(DATA_URI.findall(page)) == 2 + len(card.gallery), "two plots, and one strip per photo"
    assert len(page.encode()) < 1_000_000


def test_the_gallery_lists_exactly_the_photos_the_models_count_differently(
    models: dict[str, Path], tmp_path: Path
) -> None:
    test = write_demo_channels(tmp_path, per_class=2, size=64, seed=1)["test"]  # 10 photos: the gallery holds all
    challenger = counts_as_served(models["challenger"], test)
    champion = counts_as_served(models["champion"], test)
    differ = {name for name in challenger if challenger[name] != champion[name]}
    assert differ, "two untrained models of different archs disagree somewhere"

    lineage = version("file:///nowhere/split.csv")
    card = build_model_card(models["challenger"], test, lineage, models["champion"], gallery_size=len(challenger))
    assert {item.file for item in card.gallery} == differ
    assert card.disagreements == len(differ)
    for scores, counts in ((card.challenger, challenger), (card.champion, champion)):
        assert scores is not None
        right = [counts[name] == int(Path(name).parent.name) for name in counts]
        assert scores.accuracy.estimate == pytest.approx(np.mean(right))
    for item in card.gallery:
        assert (item.truth, item.champion, item.challenger) == (
            int(Path(item.file).parent.name),
            champion[item.file],
            challenger[item.file],
        )
    right = [{item.champion: "champion", item.challenger: "challenger"}.get(item.truth) for item in card.gallery]
    assert right == sorted(right, key=lambda who: who is None), "photos both models miss come last"


def test_each_saliency_map_is_the_size_of_its_models_input_and_not_constant(card: ModelCard) -> None:
    assert len(card.gallery) == 8, "the demo's 40 test photos hold more disagreements than a gallery shows"
    for item in card.gallery:
        for saliency, size in ((item.challenger_saliency, CHALLENGER_PX), (item.champion_saliency, CHAMPION_PX)):
            assert saliency.shape == (size, size)
            assert saliency.min() >= 0 and saliency.max() == pytest.approx(1.0)
            assert saliency.std() > 0.01, f"{item.file}: a constant map shows nothing"


def test_the_expected_calibration_error_is_the_weighted_gap_per_bin_by_hand() -> None:
    confidence = [0.05, 0.15, 0.15, 0.95, 0.95, 0.95, 0.95, 1.0]
    correct = [False, True, False, True, True, True, False, True]
    curve = reliability(np.asarray(confidence), np.asarray(correct))
    # bin [0, 0.1): 1 image, confidence 0.05, accuracy 0; [0.1, 0.2): 2, 0.15, 1/2; [0.9, 1]: 5, 0.96, 4/5
    assert [(b.low, b.images) for b in curve.bins] == [(0.0, 1), (0.1, 2), (0.9, 5)]
    assert curve.ece == pytest.approx((1 * 0.05 + 2 * 0.35 + 5 * 0.16) / 8)
    with pytest.raises(ValueError, match="one correctness per confidence"):
        reliability(np.asarray([0.5]), np.asarray([True, False]))


def test_a_card_without_a_champion_stands_alone_with_intervals_and_parity(
    models: dict[str, Path], demo_channels: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = tmp_path / "challenger"
    shutil.copytree(models["challenger"], model_dir)
    info = json.loads((model_dir / INFO_FILE).read_text())
    parity = {"passed": True, "reason": "passed parity: not worse than eager at alpha 0.05", "top1_agreement": 0.98}
    info["optimized"] = {"runtime": "another-runtime", "precision": "int8", "parity": parity}  # eager serves here
    (model_dir / INFO_FILE).write_text(json.dumps(info))

    card = build_model_card(model_dir, demo_channels["test"], version("file:///nowhere/split.csv"))
    assert (card.champion, card.comparison, card.confusion_change, card.gallery) == (None, None, None, ())
    assert set(card.calibration) == {"challenger"}
    assert card.challenger.serving == "eager"
    assert card.data.class_balance == {"test": {str(c): 8 for c in range(1, 6)}}, "no split manifest: the channel's"
    assert card.challenger.accuracy.low <= card.challenger.accuracy.estimate <= card.challenger.accuracy.high
    assert card.parity == parity
    for text in ("no champion", parity["reason"], "top1_agreement", "No champion to compare with"):
        assert text in card.markdown, text
    assert "## Per count" not in card.markdown, "per-count changes need a champion"


def test_a_champion_of_other_counts_is_refused_before_anything_is_scored(
    models: dict[str, Path], demo_channels: dict[str, Path], tmp_path: Path
) -> None:
    other = write_untrained_model_dir(tmp_path / "six", "resnet18", CHALLENGER_PX, classes=(1, 2, 3, 4, 5, 6))
    with pytest.raises(ModelCardError, match=r"predicts the counts \[1, 2, 3, 4, 5, 6\] and the challenger"):
        build_model_card(models["challenger"], demo_channels["test"], version("file:///nowhere/split.csv"), other)


def test_the_card_is_stored_as_a_page_and_a_record_under_the_uri_given(card: ModelCard, tmp_path: Path) -> None:
    folder = (tmp_path / "registry" / "bincount" / "versions" / "3").as_uri()
    page = write_model_card(Storage(), folder, card)
    assert page == f"{folder}/card.md"
    assert (tmp_path / "registry/bincount/versions/3/card.md").read_text() == card.markdown
    record = json.loads((tmp_path / "registry/bincount/versions/3/card.json").read_text())
    assert record["lineage"]["version"] == "bincount:3"
    assert record["comparison"]["verdict"] == card.comparison.verdict
    assert [item["file"] for item in record["gallery"]] == [item.file for item in card.gallery]
    assert "markdown" not in record and "strip" not in record["gallery"][0]
    assert "champion_saliency" not in record["gallery"][0]


def test_the_card_reads_in_a_real_browser_as_a_prefect_artifact(card: ModelCard, server_env: dict[str, str]) -> None:
    """The page as a reviewer sees it in the Prefect UI: every plot and photo decoded (a width above 0)."""
    if CHROMIUM is None:
        pytest.skip(
            "Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it where apt works)"
        )
    api = server_env["PREFECT_API_URL"]
    artifact = {"key": "model-card-bincount", "type": "markdown", "data": card.markdown, "description": "card"}
    created = httpx.post(f"{api}/artifacts/", json=artifact, timeout=30)
    assert created.status_code == 201, created.text
    images = 2 + len(card.gallery)
    url = f"{api.removesuffix('/api')}/artifacts/artifact/{created.json()['id']}"
    page = rendered(url, PAGE.format(mark="Where they disagree", plots=images))
    assert len(page["widths"]) == images and all(width > 0 for width in page["widths"]), page["widths"]
    assert "Model card: bincount:3" in page["text"] and "Calibration" in page["text"]
