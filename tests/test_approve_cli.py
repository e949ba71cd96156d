"""`bincount models approve|reject` answer the paused approval run on a real Prefect server (or, where no run waits,
change the registry and say so); the pause's form describes the version; the promotion names the reviewer and its
event names the endpoint, as the rollback automation needs."""

from __future__ import annotations

import contextlib
import io
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow, get_client
from prefect.artifacts import Artifact
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.input.actions import read_flow_run_input
from prefect.input.run_input import keyset_from_paused_state
from test_pipeline import events_named
from waiting import wait_until

from bincount.config import Settings
from bincount.contracts.registry import (
    DatasetRef,
    Decision,
    ImagePredictions,
    ModelMetrics,
    ModelVersion,
    ModelVersionSpec,
)
from bincount.contracts.serving import EndpointNotFoundError
from bincount.evaluation import Evaluation, score_counts
from bincount.factory import get_model_registry, get_serving_backend
from bincount.models import pack_folder, write_untrained_model_dir
from bincount.storage import file_digest
from deployments.automations import rollback_trigger
from flows.cli import main as cli
from flows.promotion import Candidate, PromotionPolicy, approve_version, promote_challenger, put_in_production
from tasks.evaluate import evaluate_and_publish

SPLIT_SHA = "ab" * 32
CODE_HASH = "cd" * 32


def spec(model_uri: str, sha256: str, seed: int) -> ModelVersionSpec:
    return ModelVersionSpec(
        model_uri=model_uri,
        model_sha256=sha256,
        metrics=ModelMetrics(accuracy=0.25, rmse=1.5, within_one_accuracy=0.5, per_class_accuracy={"1": 0.25}),
        dataset=DatasetRef("file:///datasets/abid/split.csv", SPLIT_SHA, {"train": 40, "valid": 40, "test": 40}),
        code_hash=CODE_HASH,
        hyperparameters={"arch": "resnet18", "image-size": 32, "seed": seed},
        training_job=f"bincount-final-{seed:04d}",
    )


@flow(name="release-for-approve-test")
def release(artifact_root: str, version: str) -> None:
    settings = Settings.load(artifact_root=artifact_root)
    registered = get_model_registry(settings).resolve(version)
    put_in_production(settings, registered.group, registered, "the first model")


def perfect_answers(evaluation: Evaluation) -> Evaluation:
    """A challenger that counts every image ``evaluation`` scored right: better than any untrained model."""
    assert evaluation.predictions is not None
    truth = list(evaluation.predictions.true_counts)
    perfect = score_counts(truth, truth, evaluation.classes)
    return replace(perfect, predictions=ImagePredictions(evaluation.predictions.files, tuple(truth), tuple(truth)))


@flow(name="nightly-approval-for-test")
def nightly_promotion(artifact_root: str, candidate: str, test_channel_uri: str, card_uri: str) -> Decision:
    """The nightly's promotion step with a person asked: the challenger beats what serves, so the run pauses."""
    settings = Settings.load(artifact_root=artifact_root)
    registry = get_model_registry(settings)
    version = registry.resolve(candidate)
    serving = registry.resolve(f"{version.group}:production")
    challenger = perfect_answers(evaluate_and_publish(settings, serving.model_uri, test_channel_uri, role="serving"))
    return promote_challenger(
        settings,
        Candidate(version, challenger, test_channel_uri, card_uri),
        PromotionPolicy("nightly", require_approval=True, approval_timeout_s=180),
    )


@flow(name="pipeline-approval-for-test")
def pipeline_approval(artifact_root: str, candidate: str) -> ModelVersion:
    """The pipeline's approval step (no comparison made: the form shows the champion's registered scores)."""
    settings = Settings.load(artifact_root=artifact_root)
    version = get_model_registry(settings).resolve(candidate)
    return approve_version(settings, version, True, 180, "test accuracy 0.2500 >= min_accuracy 0.0000")


def paused_run(name: str) -> UUID:
    """The id of the flow run named ``name`` once it is paused (read from the server, not through the code
    under test)."""

    def paused() -> UUID | None:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return runs[0].id if runs and runs[0].state and runs[0].state.is_paused() else None

    return wait_until(paused, timeout_s=120, interval_s=0.5, what=f"flow run {name} to pause")


def form_description(run_id: UUID) -> str:
    """What the paused run's Resume form shows above its fields."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state is not None
    return read_flow_run_input(keyset_from_paused_state(state)["description"], flow_run_id=run_id)


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = target()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def bincount(argv: list[str]) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli(argv)
    return printed.getvalue()


@dataclass
class Loop:
    root: Path
    artifact_root: str
    endpoint: str

    @property
    def settings(self) -> Settings:
        return Settings.load(artifact_root=self.artifact_root)

    def register(self, seed: int) -> ModelVersion:
        """A pending version of an untrained ResNet-18 at 32 px made with ``seed``."""
        folder = write_untrained_model_dir(self.root / f"model-{seed}", "resnet18", 32, seed=seed)
        archive = pack_folder(folder, self.root / f"archive-{seed}" / "model.tar.gz")
        return get_model_registry(self.settings).register(
            self.endpoint, spec(archive.as_uri(), file_digest(archive), seed)
        )


@pytest.fixture(scope="module")
def loop(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    """An endpoint serving version 1 of its group, with ``BINCOUNT_ARTIFACT_ROOT`` naming its artifact root."""
    root = tmp_path_factory.mktemp("approve-cli")
    state = Loop(root, str(root / "artifacts"), f"approve-{uuid.uuid4().hex[:8]}")
    first = state.register(1)
    get_model_registry(state.settings).approve(state.endpoint, 1, "alice", "the first model")
    release(state.artifact_root, str(first.ref))
    environment = pytest.MonkeyPatch()
    environment.setenv("BINCOUNT_ARTIFACT_ROOT", state.artifact_root)
    try:
        yield state
    finally:
        environment.undo()
        with contextlib.suppress(EndpointNotFoundError):
            get_serving_backend(state.settings).delete(state.endpoint)


@dataclass
class Approved:
    form: str
    printed: str
    decision: Decision
    card_uri: str


@pytest.fixture(scope="module")
def approved(loop: Loop, demo_channels: dict[str, Path]) -> Approved:
    """The nightly's promotion of version 2 paused for a person, answered by `bincount models approve`."""
    candidate = loop.register(2)
    card_uri = f"{loop.root.as_uri()}/registry/{loop.endpoint}/2/card.md"
    name = f"approve-from-cli-{uuid.uuid4().hex[:6]}"
    step = nightly_promotion.with_options(flow_run_name=name)
    thread, outcome = in_thread(
        lambda: step(loop.artifact_root, str(candidate.ref), demo_channels["test"].as_uri(), card_uri)
    )
    form = form_description(paused_run(name))
    printed = bincount(
        ["models", "approve", str(candidate.ref), "--reason", "counts the full bins well", "--reviewer", "alice"]
    )
    thread.join(timeout=300)
    assert "result" in outcome, outcome.get("error")
    return Approved(form, printed, outcome["result"], card_uri)


def test_the_pause_form_describes_the_version_its_evidence_and_lineage(approved: Approved, loop: Loop) -> None:
    form = approved.form
    assert f"Approve `{loop.endpoint}:2` for endpoint `{loop.endpoint}`?" in form
    assert f"| champion (serving) | `{loop.endpoint}:1` |" in form and "| challenger |" in form
    assert f"Evidence: {approved.decision.reason.split('; approved by')[0]}." in form, form
    assert "McNemar p=" in form and "paired bootstrap" in form, form
    for lineage in ("file:///datasets/abid/split.csv", SPLIT_SHA, CODE_HASH, "bincount-final-0002"):
        assert lineage in form, lineage
    assert f"[model card]({approved.card_uri})" in form
    assert f"bincount models approve {loop.endpoint}:2 --reason" in form


def test_cli_approve_resumes_the_paused_run_which_deploys_and_keeps_the_reviewer(
    approved: Approved, loop: Loop
) -> None:
    assert approved.printed.startswith("Answered flow run 'approve-from-cli-"), approved.printed
    assert f"which waited for approval of {loop.endpoint}:2: approved by alice" in approved.printed
    assert f"The run recorded it: {loop.endpoint}:2 is Approved by alice" in approved.printed
    version = get_model_registry(loop.settings).get(loop.endpoint, 2)
    approval = next(event for event in version.history if event.approval == "Approved")
    assert (approval.actor, approval.reason) == ("alice", "counts the full bins well")
    assert version.stage == "production"
    assert get_serving_backend(loop.settings).describe(loop.endpoint).model_ref == f"{loop.endpoint}:2"


def test_the_approved_promotion_names_the_reviewer(approved: Approved, loop: Loop) -> None:
    assert approved.decision.outcome == "promoted"
    assert approved.decision.reason.endswith("; approved by alice: counts the full bins well")
    artifact = Artifact.get(f"nightly-decision-{loop.endpoint}")
    assert artifact is not None and "approved by alice" in str(artifact.data)


def test_the_promotion_event_names_the_endpoint_as_the_rollback_automation_buckets_it(
    approved: Approved, loop: Loop
) -> None:
    trigger = rollback_trigger(24)
    about_endpoint = events_named(
        "bincount.model.promoted", where=lambda e: e.resource.id == f"bincount.endpoint.{loop.endpoint}"
    )
    about_group = events_named(
        "bincount.model.promoted", where=lambda e: e.resource.id == f"bincount.model-group.{loop.endpoint}"
    )
    for event in (about_endpoint[0], about_group[0]):
        assert trigger.match.matches(event.resource)
        assert [event.resource.get(label) for label in trigger.for_each] == [loop.endpoint], event.resource


def test_cli_reject_answers_a_paused_pipeline_approval(loop: Loop, monkeypatch: pytest.MonkeyPatch) -> None:
    candidate = loop.register(3)
    name = f"reject-from-cli-{uuid.uuid4().hex[:6]}"
    step = pipeline_approval.with_options(flow_run_name=name)
    thread, outcome = in_thread(lambda: step(loop.artifact_root, str(candidate.ref)))
    form = form_description(paused_run(name))
    assert f"Champion `{loop.endpoint}:2` (production): registered test accuracy 0.2500" in form, form
    assert "no model card stored for this version" in form
    monkeypatch.setenv("USER", "bob")  # the default reviewer
    printed = bincount(["models", "reject", str(candidate.ref), "--reason", "miscounts 5s"])
    thread.join(timeout=180)
    assert f"approval of {loop.endpoint}:3: rejected by bob" in printed, printed
    rejected = outcome["result"]
    assert (rejected.approval, rejected.history[-1].actor, rejected.history[-1].reason) == (
        "Rejected",
        "bob",
        "miscounts 5s",
    )


def test_cli_reject_with_no_run_waiting_changes_the_registry_and_says_so(
    loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    candidate = loop.register(4)
    monkeypatch.setenv("USER", "carol")
    printed = bincount(["models", "reject", str(candidate.ref), "--reason", "trained on the wrong split"])
    assert printed.startswith(f"No paused run waits for {candidate.ref}: rejected it in the registry directly"), printed
    version = get_model_registry(loop.settings).get(loop.endpoint, 4)
    assert (version.approval, version.history[-1].actor) == ("Rejected", "carol")
