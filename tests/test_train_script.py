"""sm_scripts/train.py run as SageMaker runs it: SM_* variables, flags, model dir, metric lines, checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torchvision

from bincount.config import Settings
from bincount.contracts.training import TrainingJob, TrainingJobSpec
from bincount.evaluation import evaluate_model
from bincount.local.training import LocalTrainingBackend
from bincount.loopback_s3 import LoopbackS3
from bincount.storage import storage_for
from sm_scripts import inference
from sm_scripts.data import ImageCache, augment, square_symmetries
from sm_scripts.distributed import SINGLE, Cluster, eval_order, local_batch_size, shard_order
from sm_scripts.errors import TrainingError
from sm_scripts.loop import Data, Runtime, Training, evaluate
from sm_scripts.metric_format import EPOCH_FIELDS, METRIC_DEFINITIONS, METRIC_NAMES, format_epoch_line, parse_metrics
from sm_scripts.model_dir import load_network, read_model_info
from sm_scripts.networks import OrdinalHead, predict_classes

SM_SCRIPTS = Path(__file__).resolve().parents[1] / "sm_scripts"
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.001"]
# Every kind of state a resume must carry: SGD momentum, a cosine schedule, every augmentation draw (strong:
# flips, transposes, shifts, brightness) and dropout draws. One thread: two threads on a busy 2-core machine make
# each epoch many times slower.
RESUMABLE = {
    "arch": "efficientnet_lite0",
    "image-size": 16,
    "batch-size": 8,
    "optimizer": "sgd",
    "lr": 0.01,
    "lr-scheduler": "cosine",
    "augment": "strong",
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
    assert "--augment strong there, flip now; --lr 0.01 there, 0.02 now" in failure
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


# --- data-parallel training (torchrun, gloo on this CPU) ---------------------------------------
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]


def start_torchrun(tmp: Path, channels: dict[str, Path], *flags: str) -> subprocess.Popen:
    """Two train.py processes under torchrun."""
    return subprocess.Popen(
        [*TORCHRUN, *flags],
        cwd=SM_SCRIPTS,
        env=sagemaker_env(tmp, channels),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_all(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (each in a session of its own) at once, as a lost host."""
    launcher = psutil.Process(process.pid)
    for each in [*launcher.children(recursive=True), launcher]:
        each.kill()


def run_torchrun(tmp: Path, channels: dict[str, Path], *flags: str) -> str:
    process = start_torchrun(tmp, channels, *flags)
    stdout, _ = process.communicate(timeout=300)
    assert process.returncode == 0, stdout
    return stdout


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "train_ips"} for row in history]


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory: pytest.TempPathFactory, demo_channels: dict[str, Path]) -> dict[str, object]:
    """A two-process run; the same run killed (every process, as a lost host) after its first checkpoint
    and started again; and the same run as a job of the local backend."""
    tmp = tmp_path_factory.mktemp("data-parallel")
    stdout = run_torchrun(tmp / "reference", demo_channels, *RESUMABLE_FLAGS)

    flags = [*RESUMABLE_FLAGS, "--checkpoint-dir", str(tmp / "checkpoints")]
    process = start_torchrun(tmp / "run", demo_channels, *flags)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("checkpoint: epoch 1 saved"):
                kill_all(process)
                break
    finally:
        if process.poll() is None:
            kill_all(process)
        process.wait(timeout=60)
    assert process.returncode == -9, "the run ended before it could be killed"
    interrupted = torch.load(tmp / "checkpoints" / "checkpoint.pt", weights_only=True)
    resumed = run_torchrun(tmp / "run", demo_channels, *flags)

    settings = Settings.load(artifact_root=(tmp / "artifacts").as_uri())
    spec = TrainingJobSpec(
        name="bincount-train-data-parallel",
        hyperparameters=RESUMABLE,
        channels={name: demo_channels[name].as_uri() for name in ("train", "valid")},
        output_uri=settings.artifact_uri("jobs"),
        debugger=True,  # rank 0's smdebug hook and profiler
        profiler=True,
        local_processes=2,
    )
    lines: list[str] = []
    backend = LocalTrainingBackend(settings)
    job = backend.train(spec, on_log=lines.append)
    rules = backend.rule_results(job)
    return {
        "tmp": tmp,
        "stdout": stdout,
        "interrupted": interrupted,
        "resumed": resumed,
        "job": job,
        "lines": lines,
        "rules": rules,
    }


def test_two_processes_write_once_and_repeat_their_numbers(data_parallel: dict[str, object]) -> None:
    tmp, stdout, job, lines = (data_parallel[key] for key in ("tmp", "stdout", "job", "lines"))
    assert isinstance(tmp, Path) and isinstance(stdout, str) and isinstance(lines, list)
    assert "process 0 of 2 (data-parallel)" in stdout
    # Rank 0 alone prints metric lines and writes the model dir.
    assert [parse_metrics(line)["epoch"] for line in stdout.splitlines() if line.startswith("epoch:")] == [1, 2, 3]
    info = json.loads((tmp / "reference" / "model" / "model_info.json").read_text())
    assert info["metrics"]["epochs_run"] == 3
    history = json.loads((tmp / "reference" / "output" / "data" / "history.json").read_text())
    # The local backend starts the same two processes with torchrun: the same seed gives the same numbers
    # (its debugger hook and profiler, on rank 0, watch without changing them).
    assert isinstance(job, TrainingJob) and job.status == "Completed"
    rules = data_parallel["rules"]
    assert isinstance(rules, list) and {rule.status for rule in rules} <= {"passed", "fired", "not_evaluated"}
    assert any(rule.status != "not_evaluated" for rule in rules)  # rank 0's tensors were written and read
    assert any("--nproc_per_node=2" in line for line in lines[:1])
    assert [(row["epoch"], row["eval:accuracy"], row["eval:loss"]) for row in job.metric_history] == [
        (row["epoch"], round(row["eval_acc"], 4), round(row["eval_loss"], 4)) for row in history
    ]


def test_killed_two_process_run_resumes_and_ends_as_an_uninterrupted_one(data_parallel: dict[str, object]) -> None:
    tmp, interrupted, resumed = data_parallel["tmp"], data_parallel["interrupted"], data_parallel["resumed"]
    assert isinstance(tmp, Path) and isinstance(interrupted, dict) and isinstance(resumed, str)
    assert interrupted["epoch"] == 1
    assert interrupted["fingerprint"]["processes"] == 2
    assert len(interrupted["rng"]) == 2  # each process's random states: its own augmentation draws
    assert "after epoch 1 of 3" in resumed
    expected = json.loads((tmp / "reference" / "output" / "data" / "history.json").read_text())
    history = json.loads((tmp / "run" / "output" / "data" / "history.json").read_text())
    assert without_timing(history) == without_timing(expected)  # bit for bit
    reference = torch.load(tmp / "reference" / "model" / "model.pt", weights_only=True)
    weights = torch.load(tmp / "run" / "model" / "model.pt", weights_only=True)
    assert reference.keys() == weights.keys()
    assert all(torch.equal(reference[name], weights[name]) for name in reference)


def test_two_process_checkpoint_is_refused_by_one_process(
    tmp_path: Path, data_parallel: dict[str, object], demo_channels: dict[str, Path]
) -> None:
    tmp = data_parallel["tmp"]
    assert isinstance(tmp, Path)
    shutil.copytree(tmp / "checkpoints", tmp_path / "checkpoints")
    result = run_train(
        tmp_path / "job", demo_channels, *RESUMABLE_FLAGS, "--checkpoint-dir", str(tmp_path / "checkpoints")
    )
    assert result.returncode == 2
    assert "--processes 2 there, (unset) now" in (tmp_path / "job" / "output" / "failure").read_text()


def test_shards_cover_the_channel_and_split_the_batch() -> None:
    clusters = [Cluster(rank, 2, rank, 2) for rank in range(2)]
    first = [shard_order(11, 1, 7, cluster) for cluster in clusters]
    assert [len(shard) for shard in first] == [6, 6]  # padded: both processes run as many steps
    assert set(torch.cat(first).tolist()) == set(range(11))
    assert not torch.equal(torch.cat(first), torch.cat([shard_order(11, 2, 7, cluster) for cluster in clusters]))
    assert sorted(torch.cat([eval_order(11, cluster) for cluster in clusters]).tolist()) == list(range(11))
    assert local_batch_size(64, clusters[0]) == 32
    with pytest.raises(TrainingError, match="--batch-size 7 does not split evenly over 2 processes"):
        local_batch_size(7, clusters[0])


# --- the ordinal head ------------------------------------------------------------------------
def test_ordinal_head_gives_ordered_probabilities_that_sum_to_one() -> None:
    head = OrdinalHead(8, 5)
    with torch.no_grad():
        head.gaps.copy_(torch.tensor([-9.0, 3.0, 0.0]))  # any parameters: the thresholds stay ordered
        log_probabilities = head(torch.randn(64, 8) * 10)
    assert log_probabilities.shape == (64, 5)
    assert torch.allclose(log_probabilities.exp().sum(1), torch.ones(64), atol=1e-4)
    assert bool((head.thresholds().diff() < 0).all())
    # Cross-entropy on the output is the ordinal likelihood: log_softmax leaves log-probabilities as they are.
    assert torch.allclose(log_probabilities.log_softmax(1), log_probabilities, atol=1e-4)


def test_median_decoding_predicts_where_the_cumulative_probability_reaches_one_half() -> None:
    probabilities = torch.tensor([[0.3, 0.15, 0.1, 0.15, 0.3], [0.1, 0.6, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    logits = probabilities.clamp_min(1e-9).log()
    assert predict_classes(logits, "mode").tolist() == [0, 1, 4]
    assert predict_classes(logits, "median").tolist() == [2, 1, 4]  # the mode skips the middle; the median does not
    with pytest.raises(ValueError, match="unknown decoding 'mean'"):
        predict_classes(logits, "mean")


def test_a_model_knowing_more_counts_than_valid_holds_is_scored_on_valids_counts_alone() -> None:
    """--extra-counts trains classes 0 and 6 too; valid holds 1-5, so the kept epoch is chosen on those."""
    probabilities = torch.tensor([[0.6, 0.1, 0.1, 0.2], [0.1, 0.2, 0.1, 0.6]])  # classes 0, 1, 2, 6
    logits = probabilities.log()
    data = [(logits, torch.tensor([1, 2]))]  # the network is the identity: the "images" are the logits
    identity = torch.nn.Identity()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    training = Training(
        identity,
        identity,
        torch.nn.CrossEntropyLoss(),
        optimizer,
        scheduler=None,
        generator=torch.Generator(),
        mean=None,
        std=None,
    )
    runtime = Runtime(torch.device("cpu"), False, 1, SINGLE)
    images = ImageCache(logits, torch.tensor([1, 2]), ["a.jpg", "b.jpg"])
    scored = Data(["0", "1", "2", "6"], torch.tensor([0.0, 1.0, 2.0, 6.0]), images, images)
    _, uncut_accuracy, _ = evaluate(training, runtime, iter(data), scored)
    scored.scored_classes = torch.tensor([1, 2])
    _, accuracy, rmse = evaluate(training, runtime, iter(data), scored, decoding="median")
    assert uncut_accuracy == 0.0  # 0 and 6 win uncut
    assert accuracy == 0.5 and rmse == pytest.approx(math.sqrt(0.5))  # cut to 1-2: both predict 1 (row 2's 0.2 of 0.3)


def test_ordinal_model_dir_serves_and_scores_as_a_classifier(tmp_path: Path, demo_channels: dict[str, Path]) -> None:
    result = run_train(tmp_path, demo_channels, *TINY, "--epochs", "1", "--head", "ordinal", "--decoding", "median")
    assert result.returncode == 0, result.stdout + result.stderr
    info = read_model_info(tmp_path / "model")
    assert (info["head"], info["decoding"]) == ("ordinal", "median")
    model = inference.model_fn(str(tmp_path / "model"))  # serving decodes as the model says
    photos = sorted(demo_channels["test"].rglob("*.jpg"))[:12]
    assert photos
    for path in photos:
        (answer,) = inference.predict_fn(inference.input_fn(path.read_bytes(), "image/jpeg"), model)
        cumulative = np.cumsum(list(answer["probabilities"].values()))
        assert answer["predicted_count"] == info["classes"][int(np.argmax(cumulative >= 0.5))]
    network = load_network(tmp_path / "model", info)  # what inference.py and evaluation load
    assert isinstance(network.fc, OrdinalHead)
    evaluation = evaluate_model(
        storage_for(Settings.load()), (tmp_path / "model").as_uri(), demo_channels["test"].as_uri()
    )
    assert evaluation.images == 40 and 0.0 <= evaluation.accuracy <= 1.0
    result = run_train(tmp_path / "bad", demo_channels, *TINY, "--epochs", "1", "--head", "cumulative")
    assert result.returncode == 2 and "invalid choice: 'cumulative'" in result.stderr
