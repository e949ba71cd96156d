"""Approval as a paused flow run on a real Prefect server: a person resumes it with the form, or the timeout rejects."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.flow_runs import resume_flow_run
from waiting import wait_until

from bincount.config import Settings
from bincount.contracts.registry import DatasetRef, ModelMetrics, ModelVersion, ModelVersionSpec
from bincount.contracts.serving import EndpointNotFoundError
from bincount.factory import get_model_registry, get_serving_backend
from bincount.models import write_untrained_model_dir
from flows.promotion import approve_version, put_in_production

ENDPOINT = "approval-test"


@flow(name="approval-test")
def release(artifact_root: str, model_uri: str, timeout_s: int) -> ModelVersion:
    """Register a model, wait for a reviewer, deploy it if approved: the pipeline's last steps."""
    settings = Settings.load(artifact_root=artifact_root)
    registry = get_model_registry(settings)
    metrics = ModelMetrics(accuracy=0.5, rmse=1.0, within_one_accuracy=0.8, per_class_accuracy={"1": 0.5})
    version = registry.register(
        ENDPOINT,
        ModelVersionSpec(
            model_uri=model_uri,
            model_sha256=model_uri[-12:],
            metrics=metrics,
            dataset=DatasetRef("file:///split.csv", "0" * 64, {"test": 1}),
            code_hash="c",
            hyperparameters={},
            training_job="job",
        ),
    )
    version = approve_version(settings, version, True, timeout_s, "a test model")
    if version.approval == "Approved":
        put_in_production(settings, ENDPOINT, version, "approved in a test")
    return version


def paused_run(name: str, timeout_s: float = 60) -> UUID:
    """The id of the flow run named ``name`` once it is paused."""

    def paused() -> UUID | None:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return runs[0].id if runs and runs[0].state and runs[0].state.is_paused() else None

    return wait_until(paused, timeout_s=timeout_s, interval_s=0.5, what=f"flow run {name} to pause")


def run_in_thread(**parameters: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["version"] = release.with_options(flow_run_name=parameters.pop("name"))(**parameters)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


@pytest.fixture
def artifact_root(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "artifacts")
    with contextlib.suppress(EndpointNotFoundError):
        get_serving_backend(Settings.load(artifact_root=str(tmp_path / "artifacts"))).delete(ENDPOINT)


def test_approving_the_paused_run_deploys_and_rejecting_keeps_the_serving_model(
    prefect_server: None, artifact_root: str, tmp_path: Path
) -> None:
    first = write_untrained_model_dir(tmp_path / "first", "resnet18", 32, seed=1).as_uri()
    thread, outcome = run_in_thread(name="approve-me", artifact_root=artifact_root, model_uri=first, timeout_s=120)
    resume_flow_run(paused_run("approve-me"), run_input={"approve": True, "reviewer": "alice", "reason": "counts well"})
    thread.join(timeout=180)
    approved = outcome["version"]
    assert approved.approval == "Approved" and approved.history[-1].actor == "alice"
    backend = get_serving_backend(Settings.load(artifact_root=artifact_root))
    assert backend.describe(ENDPOINT).model_ref == f"{ENDPOINT}:1"

    second = write_untrained_model_dir(tmp_path / "second", "resnet18", 32, seed=2).as_uri()
    thread, outcome = run_in_thread(name="reject-me", artifact_root=artifact_root, model_uri=second, timeout_s=120)
    resume_flow_run(paused_run("reject-me"), run_input={"approve": False, "reviewer": "bob", "reason": "miscounts 5s"})
    thread.join(timeout=180)
    rejected = outcome["version"]
    assert (rejected.version, rejected.approval, rejected.history[-1].reason) == (2, "Rejected", "miscounts 5s")
    assert backend.describe(ENDPOINT).model_ref == f"{ENDPOINT}:1", "the serving model stays"


def test_no_answer_within_the_timeout_rejects(prefect_server: None, artifact_root: str, tmp_path: Path) -> None:
    model = write_untrained_model_dir(tmp_path / "model", "resnet18", 32, seed=3).as_uri()
    thread, outcome = run_in_thread(name="nobody-answers", artifact_root=artifact_root, model_uri=model, timeout_s=3)
    thread.join(timeout=120)
    version = outcome["version"]
    assert version.approval == "Rejected" and "within 3 s" in version.history[-1].reason
    with pytest.raises(EndpointNotFoundError):
        get_serving_backend(Settings.load(artifact_root=artifact_root)).describe(ENDPOINT)
