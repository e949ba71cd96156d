"""The train-model flow on a real Prefect server: tuning with a crashing trial, retrain, rules, profile, evaluation."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from pathlib import Path

import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, TaskRunFilter, TaskRunFilterName

from bincount.config import Settings
from bincount.models import read_from_archive
from bincount.storage import Storage, storage_for
from flows.train import TrainOptions, train_model

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


async def trial_task_runs() -> dict[str, str]:
    async with get_client() as client:
        runs = await client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train-trial-")))
    return {run.name: run.state.type.value for run in runs}


def test_train_model_flow(prefect_server: None, demo_channels: dict[str, Path], tmp_path: Path) -> None:
    options = TrainOptions(
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
    result = train_model(channels, options, settings)

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
    trials = asyncio.run(trial_task_runs())
    assert set(trials) == {"train-trial-0", "train-trial-1", "train-trial-2"}
    assert sorted(trials.values()) == ["COMPLETED", "COMPLETED", "FAILED"]


def tarfile_names(storage: Storage, uri: str) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri)), mode="r:gz") as archive:
        return archive.getnames()
