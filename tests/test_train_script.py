"""sm_scripts/train.py run as SageMaker runs it: SM_* variables, flags, model dir, metric lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from sm_scripts.metric_format import EPOCH_FIELDS, METRIC_DEFINITIONS, METRIC_NAMES, format_epoch_line, parse_metrics

SM_SCRIPTS = Path(__file__).resolve().parents[1] / "sm_scripts"
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.001"]


def run_train(tmp: Path, channels: dict[str, Path], *flags: str) -> subprocess.CompletedProcess:
    """train.py from inside sm_scripts/ (as SageMaker's /opt/ml/code), with SageMaker's variables."""
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(tmp / "model"),
        "SM_OUTPUT_DIR": str(tmp / "output"),
        "SM_OUTPUT_DATA_DIR": str(tmp / "output" / "data"),
        "SM_CHANNEL_TRAIN": str(channels["train"]),
        "SM_CHANNEL_VALID": str(channels["valid"]),
        "SM_CHANNEL_TEST": str(channels["test"]),
        "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": "2",
    }
    return subprocess.run(
        [sys.executable, "train.py", *flags], cwd=SM_SCRIPTS, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, demo_channels: dict[str, Path]) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("train-script")
    result = run_train(tmp, demo_channels, *TINY, "--epochs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, result.stdout


def test_model_dir_loads_with_weights_only(trained: tuple[Path, str]) -> None:
    tmp, _ = trained
    state = torch.load(tmp / "model" / "model.pt", weights_only=True)
    info = json.loads((tmp / "model" / "model_info.json").read_text())
    assert info["arch"] == "resnet18"
    assert info["classes"] == [1, 2, 3, 4, 5]
    assert info["image_size"] == 32
    assert len(info["mean"]) == len(info["std"]) == 3
    assert info["hyperparameters"]["lr"] == 0.001 and info["hyperparameters"]["batch-size"] == 16
    assert 0.0 <= info["metrics"]["eval_acc"] <= 1.0
    model = torchvision.models.resnet18(num_classes=len(info["classes"]))
    model.load_state_dict(state)  # strict: every key and shape matches
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_metric_regexes_parse_real_output(trained: tuple[Path, str]) -> None:
    tmp, stdout = trained
    history = json.loads((tmp / "output" / "data" / "history.json").read_text())
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("epoch:")]
    assert len(epoch_lines) == len(history) == 2
    for line, row in zip(epoch_lines, history):
        parsed = parse_metrics(line)
        assert set(parsed) == {d["Name"] for d in METRIC_DEFINITIONS}
        for field, name in METRIC_NAMES.items():
            assert parsed[name] == pytest.approx(row[field], rel=1e-3, abs=0.051 if field == "train_ips" else 1e-4)
    kept = [line for line in stdout.splitlines() if line.startswith("kept")]
    assert len(kept) == 1 and parse_metrics(kept[0])["epoch"] in (1.0, 2.0)


def test_metric_line_round_trips_odd_values() -> None:
    values = {field: 0.5 for field in EPOCH_FIELDS} | {"epoch": 3, "train_loss": float("nan"), "lr": 1e-05}
    parsed = parse_metrics(format_epoch_line(values))
    assert parsed["epoch"] == 3 and parsed["train:lr"] == 1e-05
    assert parsed["train:loss"] != parsed["train:loss"]  # nan survives as nan
    assert parse_metrics("best_epoch: 3 nothing else") == {}


def test_imagenet_weights_offline_fail_clearly(tmp_path: Path, demo_channels: dict[str, Path]) -> None:
    result = run_train(tmp_path, demo_channels, *TINY, "--epochs", "1", "--weights", "imagenet")
    assert result.returncode == 2
    failure = (tmp_path / "output" / "failure").read_text()
    assert "ImageNet weights" in failure and "--weights none" in failure


def test_state_dict_weights_start_training(tmp_path: Path, trained: tuple[Path, str], demo_channels: dict[str, Path]) -> None:
    source, _ = trained
    result = run_train(tmp_path, demo_channels, *TINY, "--epochs", "1", "--weights", str(source / "model" / "model.pt"))
    assert result.returncode == 0, result.stderr
    assert f"loaded weights from {source / 'model' / 'model.pt'}" in result.stdout


def test_corrupt_image_is_named(tmp_path: Path, demo_channels: dict[str, Path]) -> None:
    broken = tmp_path / "broken"
    for split in ("train", "valid", "test"):
        for folder in demo_channels[split].iterdir():
            target = broken / split / folder.name
            target.mkdir(parents=True)
            for image in sorted(folder.iterdir())[:2]:
                (target / image.name).write_bytes(image.read_bytes())
    bad = broken / "train" / "3" / "truncated.jpg"
    bad.write_bytes(next((demo_channels["train"] / "3").iterdir()).read_bytes()[:200])
    channels = {split: broken / split for split in ("train", "valid", "test")}
    result = run_train(tmp_path / "job", channels, *TINY, "--epochs", "1")
    assert result.returncode == 2
    assert "truncated.jpg" in (tmp_path / "job" / "output" / "failure").read_text()
