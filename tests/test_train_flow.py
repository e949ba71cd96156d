"""The train-model flow on a real Prefect server: tuning with a crashing trial, retrain, rules, profile, evaluation."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import tarfile
from pathlib import Path
from uuid import UUID

import torch
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
    TaskRunFilterName,
)

from bincount.config import Settings
from bincount.models import read_from_archive, write_untrained_model_dir
from bincount.storage import Storage, storage_for
from flows.train import TrainOptions, train_model, tune_hyperparameters
from tasks.evaluate import score_model_task

ARTIFACT_KEYS = {
    "tuning-leaderboard",
    "tuning-trials",
    "training-curves",
    "debugger-rules",
    "profiler-summary",
    "confusion-matrix",
    "confusion-matrix-plot",
}


async def latest_artifacts(keys: set[str]) -> dict[str, object]:
    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=sorted(keys))))
    return {artifact.key: artifact for artifact in found}


def task_states(flow_run_id: UUID, name_like: str = "") -> dict[str, str]:
    """Task run name -> state name, in this flow run and its subflows only (other tests' runs share the server)."""
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id, *(child.id for child in children)])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name_like)),
        )
    return {run.name: run.state.name for run in runs}


def test_train_model_flow(prefect_server: None, demo_channels: dict[str, Path], tmp_path: Path) -> None:
    options = TrainOptions(
        recipe="seeds",
        arch="resnet18",
        image_size=32,
        max_jobs=3,
        max_parallel_jobs=2,
        seed=0,
        hyperparameters={"optimizer": "adamw", "debugger-save-interval": 100, "profile-steps": 2},
        search_space=[
            {"type": "continuous", "name": "lr", "low": 1e-4, "high": 1e-2, "scaling": "Logarithmic"},
            {"type": "categorical", "name": "batch-size", "values": [16, "bogus"]},  # "bogus" crashes train.py
            {"type": "integer", "name": "epochs", "low": 1, "high": 2},
        ],
    )
    channels = {name: path.as_uri() for name, path in demo_channels.items()}
    settings = Settings.load(artifact_root=str(tmp_path / "art"))
    run = train_model(channels, options, settings, return_state=True)
    result = run.result()

    assert result.tuning is not None
    statuses = [trial.status for trial in result.tuning.trials]
    assert len(statuses) == 3 and statuses[0] == "Completed" and "Failed" in statuses
    failed = next(trial for trial in result.tuning.trials if trial.status == "Failed")
    assert failed.hyperparameters["batch-size"] == "bogus" and "invalid int value" in (failed.failure_reason or "")
    best = result.tuning.trials[0]
    assert {k: result.hyperparameters[k] for k in best.hyperparameters} == best.hyperparameters
    assert result.hyperparameters["train-channels"] == "train,valid"
    assert result.hyperparameters["optimizer"] == "adamw", "the full recipe, fixed flags included"

    evaluation = result.evaluation
    assert evaluation.images == 40 and sum(map(sum, evaluation.confusion)) == 40
    assert 0 <= evaluation.accuracy <= evaluation.within_one_accuracy <= 1
    assert set(evaluation.per_class_accuracy) == {"1", "2", "3", "4", "5"}
    assert evaluation.predictions is not None and len(evaluation.predictions.files) == 40, "its answer per image"
    assert result.cost is not None and result.cost.unit == "cpu-seconds" and result.cost.billed_s > 0
    assert {rule.rule for rule in result.debugger_rules} == {
        "loss_not_decreasing",
        "overfit",
        "overtraining",
        "vanishing_gradient",
        "poor_weight_initialization",
    }
    assert all(rule.status in ("passed", "fired", "not_evaluated") and rule.evidence for rule in result.debugger_rules)
    assert result.profile["steps"] >= 2 and result.profile["top_operators"]
    assert 0 <= result.profile["data_wait_share"] < 1

    storage = storage_for(settings)
    state = torch.load(io.BytesIO(read_from_archive(storage, result.model_uri, "model.pt")), weights_only=True)
    assert state["fc.weight"].shape == (5, 512)
    info = json.loads(read_from_archive(storage, result.model_uri, "model_info.json"))
    assert info["hyperparameters"]["keep"] == "last"
    traces = [
        n
        for n in tarfile_names(storage, result.model_uri.replace("model.tar.gz", "output.tar.gz"))
        if n.endswith(".pt.trace.json")
    ]
    assert traces, "the TensorBoard trace is missing from output.tar.gz"

    artifacts = asyncio.run(latest_artifacts(ARTIFACT_KEYS))
    assert set(artifacts) == ARTIFACT_KEYS
    assert "data:image/png;base64," in artifacts["confusion-matrix-plot"].data
    assert "data:image/png;base64," in artifacts["tuning-trials"].data
    trials = task_states(run.state_details.flow_run_id, "train-trial-")
    assert set(trials) == {"train-trial-0", "train-trial-1", "train-trial-2"}
    assert sorted(trials.values()) == ["Completed", "Completed", "Failed"]

    # The cached job's model deleted (a wiped artifact folder, Prefect's cache still there): trained again.
    storage.delete(result.model_uri)
    again = train_model(channels, options, settings, return_state=True)
    assert storage.exists(again.result().model_uri)
    jobs = task_states(again.state_details.flow_run_id, "run-training-job%")
    assert sorted(jobs.values()) == ["Cached", "Completed"], "served from cache, found gone, trained again"


def tarfile_names(storage: Storage, uri: str) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri)), mode="r:gz") as archive:
        return archive.getnames()


@flow(name="score-test-channel")
def score_test_channel(model_uri: str, channel_uri: str, artifact_root: str) -> float:
    return score_model_task(Settings.load(artifact_root=artifact_root), model_uri, channel_uri, "trained").accuracy


def test_a_changed_channel_is_scored_again_an_unchanged_one_comes_from_cache(
    prefect_server: None, demo_channels: dict[str, Path], tmp_path: Path
) -> None:
    channel = tmp_path / "test"
    shutil.copytree(demo_channels["test"], channel)
    model = write_untrained_model_dir(tmp_path / "model", "resnet18", 32, seed=6).as_uri()

    def scored() -> str:
        state = score_test_channel(model, channel.as_uri(), str(tmp_path / "art"), return_state=True)
        (evaluation_state,) = task_states(state.state_details.flow_run_id, "evaluate-").values()
        return evaluation_state

    assert scored() == "Completed"
    assert scored() == "Cached"
    photos = sorted(channel.glob("*/*.jpg"), key=lambda path: path.stat().st_size)
    smaller, bigger = photos[0], photos[-1]
    replacement = smaller.read_bytes()  # another photo, padded after its end marker to the same size
    bigger.write_bytes(replacement + b"\0" * (bigger.stat().st_size - len(replacement)))
    assert scored() == "Completed", "a photo replaced by another of the same size must not be served from cache"


def test_a_trial_below_the_median_is_pruned_in_the_tuning_flow(
    prefect_server: None, demo_channels: dict[str, Path], tmp_path: Path
) -> None:
    """With seed 0 Optuna's seeded start asks lr 1e6, 0.01, 1e6: the third trial diverges like the
    first (NaN weights: one count for every photo, 0.2 accuracy), falls below the median of the
    two finished ones at epoch 2 (0.2 and lr 0.01's 0.25 here) and is stopped there, by its own
    train-trial task."""
    options = TrainOptions(
        recipe="seeds",
        arch="resnet18",
        image_size=32,
        max_jobs=3,
        seed=0,
        debugger=False,
        profiler=False,
        search_space=[
            {"type": "categorical", "name": "lr", "values": [0.01, 1e6]},
            {"type": "categorical", "name": "batch-size", "values": [16]},
            {"type": "categorical", "name": "epochs", "values": [3]},
        ],
    )
    channels = {name: path.as_uri() for name, path in demo_channels.items()}
    run = tune_hyperparameters(channels, options, Settings.load(artifact_root=str(tmp_path / "art")), return_state=True)
    trials = {trial.number: trial for trial in run.result().trials}
    assert [trials[n].hyperparameters["lr"] for n in range(3)] == [1e6, 0.01, 1e6]
    assert [trials[n].status for n in range(3)] == ["Completed", "Completed", "Stopped"], trials
    assert trials[1].objective > trials[0].objective == 0.2, "the premise: lr 0.01 beats chance by epoch 2"
    assert set(task_states(run.state_details.flow_run_id, "train-trial-").values()) == {"Completed"}
