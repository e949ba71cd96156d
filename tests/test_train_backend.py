"""The local training backend and the debugger rules, on real train.py jobs."""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from waiting import wait_until

from bincount.config import Settings
from bincount.contracts.training import TrainingJobFailed, TrainingJobSpec
from bincount.debugger_rules import check_job_rules
from bincount.factory import get_training_backend
from bincount.loopback_s3 import LoopbackS3
from bincount.models import read_from_archive
from bincount.storage import storage_for

TINY = {"arch": "resnet18", "image-size": 32, "batch-size": 16, "optimizer": "adamw", "debugger-save-interval": 100}


def uris(channels: dict[str, Path]) -> dict[str, str]:
    return {name: path.as_uri() for name, path in channels.items()}


def test_s3_channels_and_artifacts_with_healthy_debugger_run(
    s3_server: LoopbackS3, s3_client, demo_channels: dict[str, Path], tmp_path: Path
) -> None:
    s3_client.create_bucket(Bucket="train-backend")
    for split in ("train", "valid"):
        for path in demo_channels[split].rglob("*.jpg"):
            s3_client.upload_file(
                str(path), "train-backend", f"channels/{split}/{path.relative_to(demo_channels[split])}"
            )
    settings = Settings.load(artifact_root="s3://train-backend/art", s3_endpoint_url=s3_server.endpoint_url)
    spec = TrainingJobSpec(
        name="bincount-train-healthy",
        hyperparameters={**TINY, "lr": 0.001, "epochs": 4},
        channels={split: f"s3://train-backend/channels/{split}" for split in ("train", "valid")},
        output_uri=settings.artifact_uri("jobs"),
        debugger=True,
    )
    lines: list[str] = []
    job = get_training_backend(settings).train(spec, on_log=lines.append)

    assert job.status == "Completed"
    assert job.cost is not None and job.cost.unit == "cpu-seconds" and job.cost.billed_s > 0
    assert any(f"completed in {job.duration_s:.1f}s, {job.cost.summary()}" in line for line in lines)
    assert job.model_uri == "s3://train-backend/art/jobs/bincount-train-healthy/output/model.tar.gz"
    assert [row["epoch"] for row in job.metric_history] == [1, 2, 3, 4]
    assert job.metrics["eval:accuracy"] == max(row["eval:accuracy"] for row in job.metric_history)
    assert any(line.startswith("epoch: 4 ") for line in lines)
    storage = storage_for(settings)
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(job.model_uri)), mode="r:gz") as archive:
        assert sorted(archive.getnames()) == ["model.pt", "model_info.json"]
    state = torch.load(io.BytesIO(read_from_archive(storage, job.model_uri, "model.pt")), weights_only=True)
    assert state["fc.weight"].shape == (5, 512)

    rules = {rule.rule: rule for rule in check_job_rules(storage, job.debug_output_uri)}
    assert rules["loss_not_decreasing"].status == "passed", rules["loss_not_decreasing"].evidence
    assert rules["vanishing_gradient"].status == "passed"
    assert rules["poor_weight_initialization"].status == "passed", rules["poor_weight_initialization"].evidence
    assert rules["overfit"].status in ("passed", "fired") and "eval loss" in rules["overfit"].evidence


def test_absurd_learning_rate_fires_loss_not_decreasing(tmp_path: Path, demo_channels: dict[str, Path]) -> None:
    settings = Settings.load(artifact_root=str(tmp_path / "art"))
    spec = TrainingJobSpec(
        name="bincount-train-absurd",
        hyperparameters={**TINY, "optimizer": "sgd", "lr": 1e6, "epochs": 2},
        channels=uris({k: demo_channels[k] for k in ("train", "valid")}),
        output_uri=settings.artifact_uri("jobs"),
        debugger=True,
    )
    job = get_training_backend(settings).train(spec, on_log=lambda line: None)
    rules = {rule.rule: rule for rule in check_job_rules(storage_for(settings), job.debug_output_uri)}
    assert rules["loss_not_decreasing"].status == "fired", rules["loss_not_decreasing"].evidence
    assert rules["overfit"].status == "not_evaluated" and "not finite" in rules["overfit"].evidence


def test_failed_job_raises_with_reason_and_log_tail(tmp_path: Path, demo_channels: dict[str, Path]) -> None:
    settings = Settings.load(artifact_root=str(tmp_path / "art"))
    spec = TrainingJobSpec(
        name="bincount-train-no-weights",
        hyperparameters={**TINY, "epochs": 1, "weights": str(tmp_path / "missing.pt")},
        channels=uris({k: demo_channels[k] for k in ("train", "valid")}),
        output_uri=settings.artifact_uri("jobs"),
    )
    with pytest.raises(TrainingJobFailed) as raised:
        get_training_backend(settings).train(spec, on_log=lambda line: None)
    job = raised.value.job
    assert job.status == "Failed" and "missing.pt" in job.failure_reason
    assert any("ERROR" in line for line in job.log_tail)
    assert not (tmp_path / "art" / "jobs" / spec.name).exists()


def test_should_stop_ends_the_job_early(tmp_path: Path, demo_channels: dict[str, Path]) -> None:
    settings = Settings.load(artifact_root=str(tmp_path / "art"))
    spec = TrainingJobSpec(
        name="bincount-train-stopped",
        hyperparameters={**TINY, "lr": 0.001, "epochs": 10},
        channels=uris({k: demo_channels[k] for k in ("train", "valid")}),
        output_uri=settings.artifact_uri("jobs"),
    )
    job = get_training_backend(settings).train(
        spec, on_log=lambda line: None, should_stop=lambda history: len(history) >= 1
    )
    assert job.status == "Stopped"
    assert len(job.metric_history) == 1 and job.model_uri is None


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout_s: float = 20.0) -> None:
    wait_until(lambda: not is_running(pid), timeout_s=timeout_s, interval_s=0.2, what=f"process {pid} to end")


def test_interrupt_stops_the_training_process(tmp_path: Path, demo_channels: dict[str, Path]) -> None:
    settings = Settings.load(artifact_root=str(tmp_path / "art"))
    spec = TrainingJobSpec(
        name="bincount-train-interrupted",
        hyperparameters={**TINY, "lr": 0.001, "epochs": 50},
        channels=uris({k: demo_channels[k] for k in ("train", "valid")}),
        output_uri=settings.artifact_uri("jobs"),
    )
    pids: list[int] = []

    def interrupt_after_first_epoch(line: str) -> None:
        if match := re.match(r"train\.py pid (\d+):", line):
            pids.append(int(match.group(1)))
        if line.startswith("epoch: 1 "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        get_training_backend(settings).train(spec, on_log=interrupt_after_first_epoch)
    assert pids
    wait_gone(pids[0], timeout_s=1.0)


def test_killed_parent_takes_the_training_process_with_it(tmp_path: Path, demo_channels: dict[str, Path]) -> None:
    script = f"""
from pathlib import Path
from bincount.config import Settings
from bincount.contracts.training import TrainingJobSpec
from bincount.factory import get_training_backend
settings = Settings.load(artifact_root={str(tmp_path / "art")!r})
spec = TrainingJobSpec("bincount-train-orphan", {{**{TINY!r}, "epochs": 50}},
                       {{k: Path(v).as_uri() for k, v in { {k: str(v) for k, v in demo_channels.items()}!r}.items()}},
                       settings.artifact_uri("jobs"))
get_training_backend(settings).train(spec, on_log=lambda line: print(line, flush=True))
"""
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True
    )
    child = None
    for line in parent.stdout:
        if match := re.match(r"train\.py pid (\d+):", line):
            child = int(match.group(1))
            break
    assert child is not None and is_running(child)
    parent.send_signal(signal.SIGKILL)  # what a worker does to a cancelled flow run that will not stop
    parent.wait()
    wait_gone(child)  # train.py must not outlive the process that started it
