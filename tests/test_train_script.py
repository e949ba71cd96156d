"""sm_scripts/train.py run as SageMaker runs it: SM_* variables, flags, model dir, metric lines, checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from bincount.config import Settings
from bincount.contracts.training import TrainingJobSpec
from bincount.local.training import LocalTrainingBackend
from bincount.loopback_s3 import LoopbackS3
from bincount.storage import storage_for
from sm_scripts.data import augment, square_symmetries
from sm_scripts.metric_format import EPOCH_FIELDS, METRIC_DEFINITIONS, METRIC_NAMES, format_epoch_line, parse_metrics

SM_SCRIPTS = Path(__file__).resolve().parents[1] / "sm_scripts"
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.001"]
# Every kind of state a resume must carry: SGD momentum, a cosine schedule, augmentation and dropout
# draws. One thread: two threads on a busy 2-core machine make each epoch many times slower.
RESUMABLE = {
    "arch": "efficientnet_lite0",
    "image-size": 16,
    "batch-size": 8,
    "optimizer": "sgd",
    "lr": 0.01,
    "lr-scheduler": "cosine",
    "augment": "standard",
    "keep": "last",
    "epochs": 3,
    "seed": 7,
    "threads": 1,
}
RESUMABLE_FLAGS = [str(part) for name, value in RESUMABLE.items() for part in (f"--{name}", value)]


def sagemaker_env(tmp: Path, channels: dict[str, Path]) -> dict[str, str]:
    return {
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


def run_train(tmp: Path, channels: dict[str, Path], *flags: str) -> subprocess.CompletedProcess:
    """train.py from inside sm_scripts/ (as SageMaker's /opt/ml/code), with SageMaker's variables."""
    return subprocess.run(
        [sys.executable, "train.py", *flags],
        cwd=SM_SCRIPTS,
        env=sagemaker_env(tmp, channels),
        capture_output=True,
        text=True,
        timeout=300,
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
    for line, row in zip(epoch_lines, history, strict=True):
        parsed = parse_metrics(line)
        assert set(parsed) == {d["Name"] for d in METRIC_DEFINITIONS}
        for field, name in METRIC_NAMES.items():
            assert parsed[name] == pytest.approx(row[field], rel=1e-3, abs=0.051 if field == "train_ips" else 1e-4)
    kept = [line for line in stdout.splitlines() if line.startswith("kept")]
    assert len(kept) == 1 and parse_metrics(kept[0])["epoch"] in (1.0, 2.0)


def test_metric_line_round_trips_odd_values() -> None:
    values = dict.fromkeys(EPOCH_FIELDS, 0.5) | {"epoch": 3, "train_loss": float("nan"), "lr": 1e-05}
    parsed = parse_metrics(format_epoch_line(values))
    assert parsed["epoch"] == 3 and parsed["train:lr"] == 1e-05
    assert parsed["train:loss"] != parsed["train:loss"]  # nan survives as nan
    assert parse_metrics("best_epoch: 3 nothing else") == {}


def test_square_symmetries_draw_all_eight_and_keep_each_image() -> None:
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).view(1, 3, 4, 4)  # every pixel distinct
    turned = [image.rot90(k, (-2, -1)) for k in range(4)]
    symmetries = [*turned, *(t.flip(-1) for t in turned)]
    batch = image.repeat(200, 1, 1, 1)
    batch[::2] = batch[::2].flip(-1)  # augment's random horizontal flip comes first
    out = square_symmetries(batch, torch.Generator().manual_seed(0))
    drawn = [next(i for i, s in enumerate(symmetries) if torch.equal(o[None], s)) for o in out]  # StopIteration if none
    assert sorted(set(drawn)) == list(range(8))
    assert min(drawn.count(i) for i in range(8)) > 10


def test_strong_augmentation_keeps_shape_and_type() -> None:
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    out = augment(images, "strong", torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8 and not torch.equal(out, images)


def test_imagenet_weights_offline_fail_clearly(tmp_path: Path, demo_channels: dict[str, Path]) -> None:
    result = run_train(tmp_path, demo_channels, *TINY, "--epochs", "1", "--weights", "imagenet")
    assert result.returncode == 2
    failure = (tmp_path / "output" / "failure").read_text()
    assert "ImageNet weights" in failure and "--weights none" in failure


def test_state_dict_weights_start_training(
    tmp_path: Path, trained: tuple[Path, str], demo_channels: dict[str, Path]
) -> None:
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


# --- checkpoints and resume ------------------------------------------------------------------
def kill_after_first_checkpoint(tmp: Path, channels: dict[str, Path], *flags: str) -> None:
    """Start train.py and SIGKILL it as soon as it reports its first checkpoint (a spot interruption)."""
    process = subprocess.Popen(
        [sys.executable, "train.py", *flags],
        cwd=SM_SCRIPTS,
        env=sagemaker_env(tmp, channels),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("checkpoint: epoch 1 saved"):
                process.kill()
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -9, "train.py ended before it could be killed"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory, demo_channels: dict[str, Path]) -> dict[str, object]:
    """An uninterrupted run, and the same run killed after its first checkpoint and started again."""
    tmp = tmp_path_factory.mktemp("resume")
    reference = run_train(tmp / "reference", demo_channels, *RESUMABLE_FLAGS)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    flags = [*RESUMABLE_FLAGS, "--checkpoint-dir", str(tmp / "checkpoints")]
    kill_after_first_checkpoint(tmp / "run", demo_channels, *flags)
    interrupted = torch.load(tmp / "checkpoints" / "checkpoint.pt", weights_only=True)
    second = run_train(tmp / "run", demo_channels, *flags)
    assert second.returncode == 0, second.stdout + second.stderr
    return {"tmp": tmp, "interrupted": interrupted, "stdout": second.stdout}


def test_killed_run_resumes_and_ends_as_an_uninterrupted_one(resumed: dict[str, object]) -> None:
    tmp, stdout, interrupted = resumed["tmp"], resumed["stdout"], resumed["interrupted"]
    assert isinstance(tmp, Path) and isinstance(stdout, str) and isinstance(interrupted, dict)
    done = interrupted["epoch"]
    assert 1 <= done < RESUMABLE["epochs"]  # killed in the middle of the run
    assert f"resumed from checkpoint {tmp / 'checkpoints' / 'checkpoint.pt'} after epoch {done} of 3" in stdout
    assert {"fingerprint", "model", "optimizer", "scheduler", "best", "stale", "history", "rng"} <= set(interrupted)
    assert interrupted["fingerprint"]["lr"] == 0.01 and "checkpoint-dir" not in interrupted["fingerprint"]
    # The log still holds every epoch (those before the kill replayed), as tuners and curves expect.
    assert [parse_metrics(line)["epoch"] for line in stdout.splitlines() if line.startswith("epoch:")] == [1, 2, 3]

    # Same seed, same flags: the same numbers, bit for bit (train.py runs deterministic CPU kernels,
    # and the checkpoint restores every tensor and random state the next epoch reads).
    timing = "train_ips"  # throughput: the one field that depends on the clock
    expected = json.loads((tmp / "reference" / "output" / "data" / "history.json").read_text())
    history = json.loads((tmp / "run" / "output" / "data" / "history.json").read_text())
    assert [{k: v for k, v in row.items() if k != timing} for row in history] == [
        {k: v for k, v in row.items() if k != timing} for row in expected
    ]
    reference = torch.load(tmp / "reference" / "model" / "model.pt", weights_only=True)
    weights = torch.load(tmp / "run" / "model" / "model.pt", weights_only=True)
    assert reference.keys() == weights.keys()
    assert all(torch.equal(reference[name], weights[name]) for name in reference)


def test_checkpoint_of_other_hyperparameters_is_refused(
    tmp_path: Path, resumed: dict[str, object], demo_channels: dict[str, Path]
) -> None:
    tmp = resumed["tmp"]
    assert isinstance(tmp, Path)
    shutil.copytree(tmp / "checkpoints", tmp_path / "checkpoints")
    before = (tmp_path / "checkpoints" / "checkpoint.pt").read_bytes()
    flags = [*RESUMABLE_FLAGS, "--lr", "0.02", "--augment", "flip", "--checkpoint-dir", str(tmp_path / "checkpoints")]
    result = run_train(tmp_path / "job", demo_channels, *flags)
    assert result.returncode == 2
    failure = (tmp_path / "job" / "output" / "failure").read_text()
    assert "--augment standard there, flip now; --lr 0.01 there, 0.02 now" in failure
    assert "fresh --checkpoint-dir" in failure
    assert not re.search(r"^epoch: ", result.stdout, re.MULTILINE)  # refused before training anything
    assert (tmp_path / "checkpoints" / "checkpoint.pt").read_bytes() == before  # and the checkpoint left as it was


class Interrupted(Exception):
    """Stands for whatever ends a task attempt mid-job: a cancel, a crash of the flow run."""


def test_local_backend_retry_resumes_from_the_jobs_checkpoints(
    s3_server: LoopbackS3, s3_client, demo_channels: dict[str, Path]
) -> None:
    s3_client.create_bucket(Bucket="train-resume")
    settings = Settings.load(artifact_root="s3://train-resume/art", s3_endpoint_url=s3_server.endpoint_url)
    storage = storage_for(settings)
    spec = TrainingJobSpec(
        name="bincount-train-resume",
        hyperparameters=RESUMABLE,
        channels={name: demo_channels[name].as_uri() for name in ("train", "valid")},
        output_uri=settings.artifact_uri("jobs"),
    )
    checkpoints = f"{spec.output_uri}/{spec.name}/checkpoints"

    def interrupt_after_first_checkpoint(line: str) -> None:
        if line.startswith("checkpoint: epoch 1 saved"):
            raise Interrupted(line)

    backend = LocalTrainingBackend(settings)
    with pytest.raises(Interrupted):
        backend.train(spec, on_log=interrupt_after_first_checkpoint)
    assert storage.exists(f"{checkpoints}/checkpoint.pt")  # uploaded before the attempt ended

    lines: list[str] = []
    job = backend.train(spec, on_log=lines.append)  # the retry: same job name, same output
    assert job.status == "Completed"
    assert any(line.startswith("resumed from checkpoint") and "after epoch 1 of 3" in line for line in lines)
    assert [row["epoch"] for row in job.metric_history] == [1, 2, 3]
    assert "checkpoint-dir" not in job.hyperparameters
    assert list(storage.list(checkpoints)) == []  # a completed job's checkpoints are gone
