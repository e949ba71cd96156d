"""The whole pipeline and the nightly retrain on demo data, on a real Prefect server, on the CPU."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import boto3
import numpy as np
import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentTaskRunId,
)
from prefect.client.schemas.sorting import ArtifactSort
from prefect.events.filters import EventFilter, EventNameFilter, EventOrder, EventResourceFilter

from bincount.config import Settings
from bincount.demo_data import generate_demo_bucket, jpeg_bytes, render_bin_image
from bincount.registry import Registry
from bincount.serving.backend import EndpointNotFoundError, get_serving_backend
from bincount.storage import Storage, local_path
from flows.data import DataOptions
from flows.nightly import nightly_retrain
from flows.pipeline import pipeline
from flows.train import TrainOptions

ENDPOINT = "pipeline-test"
TINY = TrainOptions(
    arch="resnet18",
    image_size=32,
    max_jobs=2,
    seed=0,
    hyperparameters={"debugger-save-interval": 50, "profile-steps": 2},
    search_space=[
        {"type": "continuous", "name": "lr", "low": 0.01, "high": 0.05, "scaling": "Logarithmic"},
        {"type": "categorical", "name": "batch-size", "values": [32]},
        {"type": "integer", "name": "epochs", "low": 2, "high": 3},
    ],
)


def all_task_states(flow_run_id: UUID) -> dict[str, set[str]]:
    """Task name -> the states of its runs, in this flow run and every subflow under it."""
    states: dict[str, set[str]] = {}
    with get_client(sync_client=True) as client:
        pending = [flow_run_id]
        while pending:
            run_id = pending.pop()
            for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))):
                states.setdefault(task_run.name.rsplit("-", 1)[0], set()).add(task_run.state.name)
                children = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[task_run.id]))
                )
                pending += [child.id for child in children]
    return states


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("pipeline")
    bucket = (root / "bucket").as_uri()
    generate_demo_bucket(Storage(), bucket, images=150, seed=1, size=64)
    env = {"source_uri": bucket, "artifact_root": str(root / "artifacts")}
    yield env
    backend = get_serving_backend(Settings.load(artifact_root=env["artifact_root"]))
    with contextlib.suppress(EndpointNotFoundError):  # stop the endpoint's processes
        backend.delete(ENDPOINT)


def test_pipeline_end_to_end_then_served_from_cache(prefect_server, demo: dict[str, str], monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BINCOUNT_DATA_DIR", str(tmp_path / "raw"))
    state = pipeline(DataOptions(), TINY, endpoint_name=ENDPOINT, return_state=True, **demo)
    result = state.result()

    endpoint = get_serving_backend(Settings.load(artifact_root=demo["artifact_root"])).describe(ENDPOINT)
    assert endpoint.model_uri == result.model_uri
    runtime = boto3.client("sagemaker-runtime", endpoint_url=endpoint.url, region_name="us-east-1")
    photo = jpeg_bytes(render_bin_image(3, np.random.default_rng(0), 64))
    answer = json.loads(runtime.invoke_endpoint(EndpointName=ENDPOINT, Body=photo, ContentType="image/jpeg")["Body"].read())
    assert answer["predictions"][0]["predicted_count"] in (1, 2, 3, 4, 5)

    scored = result.batch_transform
    outputs = sorted(local_path(scored["output_uri"]).rglob("*.out"))
    assert len(outputs) == scored["scored"] > 0
    assert Registry(Settings.load(artifact_root=demo["artifact_root"]), ENDPOINT).best_hyperparameters()

    rerun = pipeline(DataOptions(), TINY, endpoint_name=ENDPOINT, return_state=True, **demo)
    states = all_task_states(rerun.state_details.flow_run_id)
    for expensive in ("download-images", "split-dataset", "report-data", "train-trial", "run-training-job"):
        assert states[expensive] == {"Cached"}, (expensive, states[expensive])
    assert rerun.result().model_uri == result.model_uri


NIGHTLY = TrainOptions(
    arch="resnet18", image_size=64, seed=0, hyperparameters={"optimizer": "adamw", "lr-scheduler": "cosine"}, debugger=False, profiler=False
)
LEARNS = {"lr": 0.003, "batch-size": 32, "epochs": 10}  # about 0.45 test accuracy on this demo data (chance: 0.2)
DIVERGES = {**LEARNS, "lr": 50.0}  # a deliberately worse challenger: it predicts one count for every photo


def latest_artifact_description(key: str) -> str:
    async def read() -> str:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
            )
        return found[0].description or ""

    return asyncio.run(read())


def decision_events(endpoint: str, expected: int, timeout_s: float = 30.0) -> list[tuple[str, dict]]:
    """The nightly's events about ``endpoint`` (name, payload), oldest first, once ``expected`` have arrived."""

    async def read() -> list[tuple[str, dict]]:
        async with get_client() as client:
            page = await client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(prefix=["bincount.model."]),
                    resource=EventResourceFilter(id=[f"bincount.endpoint.{endpoint}"]),
                    order=EventOrder.ASC,
                ),
                limit=50,
            )
        return [(event.event, event.payload) for event in page.events]

    deadline = time.monotonic() + timeout_s  # events reach the server asynchronously
    while len(events := asyncio.run(read())) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return events


def test_nightly_promotes_only_a_better_model(prefect_server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BINCOUNT_DATA_DIR", str(tmp_path / "raw"))
    bucket = (tmp_path / "bucket").as_uri()
    generate_demo_bucket(Storage(), bucket, images=400, seed=3, size=64)
    where = {"source_uri": bucket, "artifact_root": str(tmp_path / "artifacts")}
    settings = Settings.load(artifact_root=where["artifact_root"])
    registry, backend = Registry(settings, "nightly-test"), get_serving_backend(settings)
    nightly = lambda: nightly_retrain(DataOptions(), NIGHTLY, endpoint_name="nightly-test", margin=0.01, **where)  # noqa: E731
    try:
        registry.save_best_hyperparameters(LEARNS, "known-good", {})
        first = nightly()
        assert first["promoted"] and first["serving_score"] is None, "nothing served yet"
        assert latest_artifact_description("nightly-decision-nightly-test") == "Nightly decision for nightly-test: promoted"
        assert backend.describe("nightly-test").model_uri == first["challenger_model_uri"]

        registry.save_best_hyperparameters(DIVERGES, "deliberately-diverging", {})
        worse = nightly()
        assert not worse["promoted"], worse["reason"]
        assert latest_artifact_description("nightly-decision-nightly-test") == "Nightly decision for nightly-test: kept the serving model"
        assert worse["challenger_score"] < worse["serving_score"] + 0.01
        assert backend.describe("nightly-test").model_uri == first["challenger_model_uri"]
        trained, serving = latest_artifact_description("confusion-matrix"), latest_artifact_description("confusion-matrix-serving")
        assert f"test accuracy {worse['challenger_score']:.4f}" in trained, "the trained model's own matrix"
        assert f"test accuracy {worse['serving_score']:.4f}" in serving, "the serving model's matrix, kept apart"

        backend.deploy("nightly-test", worse["challenger_model_uri"])  # the worse model now serves
        registry.save_best_hyperparameters(LEARNS, "known-good", {})
        better = nightly()
        assert better["promoted"], better["reason"]
        assert backend.describe("nightly-test").model_uri == better["challenger_model_uri"]
        assert [decision.promoted for decision in registry.decisions()] == [True, False, True]
        events = decision_events("nightly-test", expected=3)
        assert [name for name, _ in events] == ["bincount.model.promoted", "bincount.model.kept", "bincount.model.promoted"]
        assert [payload["challenger_model_uri"] for _, payload in events] == [
            first["challenger_model_uri"], worse["challenger_model_uri"], better["challenger_model_uri"]
        ]
    finally:
        with contextlib.suppress(EndpointNotFoundError):
            backend.delete("nightly-test")
