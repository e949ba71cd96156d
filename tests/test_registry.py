"""The model registry on file:// and on S3 (moto on loopback): versions, stages, approvals, concurrency, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import boto3
import numpy as np
import pytest
from prefect import get_client
from prefect.artifacts import Artifact
from prefect.events.filters import EventFilter, EventNameFilter
from waiting import wait_until

from bincount.config import Settings
from bincount.contracts.registry import (
    DatasetRef,
    HeldVersionError,
    ImagePredictions,
    InvalidReferenceError,
    InvalidTransitionError,
    ModelMetrics,
    ModelVersionSpec,
    NoPreviousProductionError,
    RegistryError,
    UnsupportedFormatError,
    VersionNotFoundError,
    VersionRef,
    parse_reference,
)
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.evaluation import score_counts
from bincount.registry import (
    StorageModelRegistry,
    dataset_ref,
    decide,
    object_sha256,
)
from bincount.storage import Storage

PROJECT = Path(__file__).resolve().parents[1]
GROUP = "bincount"


def spec(n: int, **changes) -> ModelVersionSpec:
    fields = {
        "model_uri": f"file:///models/job-{n}/output/model.tar.gz",
        "model_sha256": f"{n:064x}",
        "metrics": ModelMetrics(
            accuracy=0.5 + n / 100, rmse=1.0, within_one_accuracy=0.9, per_class_accuracy={"1": 0.5}, images=50
        ),
        "dataset": DatasetRef("file:///datasets/abid/split.csv", "ab" * 32, {"train": 400, "valid": 50, "test": 50}),
        "code_hash": "cd" * 32,
        "hyperparameters": {"lr": 0.01, "batch-size": 32, "epochs": 3, "arch": "resnet18", "image-size": 64, "seed": 0},
        "training_job": f"bincount-final-{n:010d}",
        "flow_run_id": str(uuid.UUID(int=n)),
        "flow_run_url": f"http://127.0.0.1:4200/runs/flow-run/{uuid.UUID(int=n)}",
    }
    fields.update(changes)
    return ModelVersionSpec(**fields)


@pytest.fixture(params=["file", "s3"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> StorageModelRegistry:
    if request.param == "file":
        return StorageModelRegistry(Storage(), tmp_path.as_uri())
    server = request.getfixturevalue("s3_server")
    bucket = f"registry-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return StorageModelRegistry(Storage(s3_endpoint_url=server.endpoint_url), f"s3://{bucket}/bincount")


def test_a_version_records_its_lineage_and_is_stored_once(registry: StorageModelRegistry) -> None:
    first = registry.register(GROUP, spec(1))
    assert (first.ref, first.stage, first.approval) == (VersionRef(GROUP, 1), "candidate", "PendingManualApproval")
    second = registry.register(GROUP, spec(2))
    assert second.version == 2
    again = registry.get(GROUP, 1)
    assert again.spec == spec(1) and again.created_at == first.created_at
    stored = json.loads(registry.storage.read_bytes(f"{registry.root}/{GROUP}/versions/000001.json"))
    assert stored["format"] == 1 and stored["spec"]["hyperparameters"]["batch-size"] == 32
    assert stored["spec"]["flow_run_url"].endswith(str(uuid.UUID(int=1)))
    # A retried registration of the same model finds its version instead of making another.
    assert registry.register(GROUP, spec(1)).version == 1
    assert [v.version for v in registry.list(GROUP)] == [1, 2] and registry.groups() == [GROUP]
    assert registry.find_by_model_uri(GROUP, spec(2).model_uri).version == 2
    assert registry.find_by_model_uri(GROUP, "file:///elsewhere/model.tar.gz") is None
    assert registry.resolve("bincount:latest").version == 2 and registry.resolve("bincount:1").version == 1


def test_stages_and_approvals_come_from_events_and_rollback_goes_back_one(registry: StorageModelRegistry) -> None:
    for n in (1, 2, 3):
        registry.register(GROUP, spec(n))
    assert registry.production(GROUP) is None
    with pytest.raises(InvalidTransitionError, match=r"bincount:1 is PendingManualApproval.*approve it first"):
        registry.transition(GROUP, 1, "production", "nightly", "beats nothing")
    registry.approve(GROUP, 1, "alice", "looked at the confusion matrix")
    registry.transition(GROUP, 1, "production", "pipeline", "first model")
    registry.approve(GROUP, 2, "nightly-retrain", "beats v1 by 0.02")
    registry.transition(GROUP, 2, "production", "nightly-retrain", "beats v1 by 0.02")
    states = {v.version: (v.stage, v.approval) for v in registry.list(GROUP)}
    assert states == {
        1: ("archived", "Approved"),
        2: ("production", "Approved"),
        3: ("candidate", "PendingManualApproval"),
    }
    assert registry.resolve("bincount:production").version == 2
    assert registry.previous_production(GROUP).version == 1
    history = registry.get(GROUP, 2).history
    assert [(e.kind, e.actor, e.reason) for e in history] == [
        ("approval", "nightly-retrain", "beats v1 by 0.02"),
        ("stage", "nightly-retrain", "beats v1 by 0.02"),
    ]
    back = registry.rollback(GROUP, "bob", "v2 answers slowly")
    assert back.version == 1 and back.stage == "production" and registry.get(GROUP, 2).stage == "archived"
    with pytest.raises(NoPreviousProductionError, match="no earlier production version to roll back to"):
        registry.previous_production(GROUP)  # v2 was rolled back from: rolling back again has nowhere to go
    # A rejected version is never a rollback target.
    registry.approve(GROUP, 3, "alice", "ok")
    with pytest.raises(HeldVersionError, match=r"bincount:3 matches bincount:2 .*held since a rollback by bob"):
        registry.transition(GROUP, 3, "production", "alice", "try v3")  # v3 has v2's recipe and data: held
    registry.release_hold(GROUP, 2, "alice", "v2's slowness was the host")
    registry.transition(GROUP, 3, "production", "alice", "try v3")
    registry.reject(GROUP, 1, "carol", "v1 miscounts 5s")
    with pytest.raises(NoPreviousProductionError):
        registry.previous_production(GROUP)
    with pytest.raises(
        InvalidTransitionError, match=r"bincount:1 was rejected by carol: v1 miscounts 5s.*register a new version"
    ):
        registry.approve(GROUP, 1, "dave", "changed my mind")
    with pytest.raises(InvalidTransitionError, match="only an approved version goes to production: it was rejected"):
        registry.transition(GROUP, 1, "production", "dave", "force")


def test_two_processes_registering_at_once_lose_nothing(registry: StorageModelRegistry, tmp_path: Path) -> None:
    """Two real processes, each registering 15 models and approving each, started together."""
    start = tmp_path / "go"
    endpoint = registry.storage.s3.meta.endpoint_url if registry.root.startswith("s3://") else None
    per_process = 15
    script = f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(PROJECT)!r}); sys.path.insert(0, {str(PROJECT / "tests")!r})
from test_registry import spec
from bincount.registry import StorageModelRegistry
from bincount.storage import Storage
worker = int(sys.argv[1])
storage = Storage(s3_endpoint_url={endpoint!r})
registry = StorageModelRegistry(storage, {registry.root.rsplit("/", 1)[0]!r})
Path({str(tmp_path)!r}, f"ready-{{worker}}").touch()
while not Path({str(start)!r}).exists():
    time.sleep(0.005)
for i in range({per_process}):
    version = registry.register("bincount", spec(1000 * worker + i))
    registry.approve("bincount", version.version, f"worker-{{worker}}", "concurrent")
"""
    workers = [subprocess.Popen([sys.executable, "-c", script, str(w)], cwd=PROJECT) for w in (1, 2)]
    wait_until(
        lambda: all((tmp_path / f"ready-{w}").exists() for w in (1, 2)), timeout_s=120, what="both workers to start"
    )
    start.touch()  # both processes imported and waiting: go
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    versions = registry.list(GROUP)
    assert [v.version for v in versions] == list(range(1, 2 * per_process + 1)), "distinct numbers, none lost"
    assert sorted(v.spec.training_job for v in versions) == sorted(
        spec(1000 * w + i).training_job for w in (1, 2) for i in range(per_process)
    )
    assert all(v.approval == "Approved" and len(v.history) == 1 for v in versions), "every event kept"


def test_best_hyperparameters_only_for_a_better_model_and_decisions_kept_typed(
    registry: StorageModelRegistry,
) -> None:
    assert registry.best_hyperparameters(GROUP) is None
    assert registry.save_best_hyperparameters(GROUP, {"lr": 0.02}, "job-a", {"accuracy": 0.6}, version=1)
    assert not registry.save_best_hyperparameters(GROUP, {"lr": 0.09}, "job-b", {"accuracy": 0.55})
    assert not registry.save_best_hyperparameters(GROUP, {"lr": 0.09}, "job-c", {})
    best = registry.best_hyperparameters(GROUP)
    assert (best.hyperparameters, best.job_name, best.version) == ({"lr": 0.02}, "job-a", 1)

    first = decide(GROUP, score_counts([1, 2], [1, 3], [1, 2, 3, 4, 5]), "file:///m/1", None, None, 0.01)
    registry.record(first)
    truth = [1 + i % 5 for i in range(20)]
    files = [f"{count}/{i}.jpg" for i, count in enumerate(truth)]
    serving = score_counts(truth, truth[:11] + [1] * 9, [1, 2, 3, 4, 5])  # 11 right (and the 1s among the rest)
    challenger = score_counts(truth, truth[:10] + [1] * 10, [1, 2, 3, 4, 5])
    new = decide(
        GROUP,
        replace(challenger, predictions=ImagePredictions(tuple(files), tuple(truth), tuple(truth[:10] + [1] * 10))),
        "file:///m/2",
        replace(serving, predictions=ImagePredictions(tuple(files), tuple(truth), tuple(truth[:11] + [1] * 9))),
        "file:///m/1",
        0.01,
        challenger_version=2,
        serving_version=1,
    )
    registry.record(new)
    assert [(d.promoted, d.challenger_version) for d in registry.decisions(GROUP)] == [(True, None), (False, 2)]
    assert registry.decisions(GROUP)[-1].comparison == new.comparison, "the paired test is kept, typed"


def test_dataset_and_model_hashes_come_from_the_stored_objects(tmp_path: Path) -> None:
    storage = Storage()
    split = tmp_path / "split.csv"
    split.write_text(
        "id,label,split,uri,sha256\n1,1,train,s3://x/1.jpg,00\n2,2,train,s3://x/2.jpg,00\n3,3,test,s3://x/3.jpg,00\n"
    )
    ref = dataset_ref(storage, split.as_uri())
    assert ref.counts == {"train": 2, "valid": 0, "test": 1} and ref.split_sha256 == object_sha256(
        storage, split.as_uri()
    )


# --- bad input: clear errors, nothing lost ------------------------------------------------------
def test_unknown_versions_and_bad_references(registry: StorageModelRegistry) -> None:
    registry.register(GROUP, spec(1))
    with pytest.raises(
        VersionNotFoundError, match=r"no version 7 \(it has versions 1-1\).*bincount models list --group bincount"
    ):
        registry.get(GROUP, 7)
    with pytest.raises(VersionNotFoundError, match="no version in production"):
        registry.resolve("bincount:production")
    with pytest.raises(VersionNotFoundError, match="has no versions"):
        registry.resolve("other:latest")
    assert parse_reference(" bincount:12 ") == VersionRef(GROUP, 12)
    for text in ("bincount", "bincount/3", "bincount:0", "bincount:-1", "bin count:3", "-bad-:1", "bincount:prod"):
        with pytest.raises(InvalidReferenceError):
            parse_reference(text)
    with pytest.raises(InvalidReferenceError, match="name it like the endpoint it serves"):
        registry.register("../escape", spec(2))
    with pytest.raises(RegistryError, match="non-empty actor and reason"):
        registry.approve(GROUP, 1, "alice", " ")
    with pytest.raises(RegistryError, match="stage 'staging'"):
        registry.transition(GROUP, 1, "staging", "alice", "why")  # type: ignore[arg-type]
    with pytest.raises(RegistryError, match="plain JSON values"):
        registry.register(GROUP, spec(3, hyperparameters={"lr": object()}))
    assert [v.version for v in registry.list(GROUP)] == [1]


def test_registry_paths_stay_under_the_artifact_root(tmp_path: Path) -> None:
    for path in ("../registry", "/etc", "s3://other/registry", "registry/../../x", ""):
        with pytest.raises(InvalidReferenceError, match="outside the artifact root"):
            StorageModelRegistry(Storage(), tmp_path.as_uri(), path=path)
    with pytest.raises(InvalidReferenceError, match="file:// or s3://"):
        StorageModelRegistry(Storage(), str(tmp_path))


def test_objects_of_a_newer_format_are_refused_and_left_alone(registry: StorageModelRegistry) -> None:
    registry.register(GROUP, spec(1))
    newer = f"{registry.root}/{GROUP}/versions/000002.json"
    body = json.dumps({"format": 2, "group": GROUP, "version": 2, "something": "new"}).encode()
    registry.storage.write_bytes(newer, body)
    with pytest.raises(UnsupportedFormatError, match=r"newer bincount.*format 2.*upgrade bincount"):
        registry.list(GROUP)
    with pytest.raises(UnsupportedFormatError):
        registry.register(GROUP, spec(3))
    assert registry.storage.read_bytes(newer) == body
    assert (
        json.loads(registry.storage.read_bytes(f"{registry.root}/{GROUP}/versions/000001.json"))["spec"]["model_uri"]
        == spec(1).model_uri
    )
    registry.storage.write_bytes(newer, b"{not json")
    with pytest.raises(RegistryError, match=r"000002\.json is not a registry object"):
        registry.get(GROUP, 1)


# --- the `bincount models` command ------------------------------------------------------------------
def approval_events(name: str) -> list:
    """Events ``name`` about version 1 of the group on the test server."""
    related = f"bincount.model-version.{GROUP}.1"
    with get_client(sync_client=True) as client:
        found = client.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50).events
    return [event for event in found if any(resource.id == related for resource in event.related)]


def test_models_command_lists_shows_approves_and_refuses_clearly(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bincount.contracts.serving import EndpointRecord
    from bincount.endpoints import EndpointRecords
    from flows.cli import main

    monkeypatch.setenv("BINCOUNT_ARTIFACT_ROOT", tmp_path.as_uri())
    settings = Settings.load()
    registry = StorageModelRegistry.from_settings(settings)
    registry.register(GROUP, spec(1))
    registry.register(GROUP, spec(2))
    EndpointRecords(settings, registry.storage).write(
        EndpointRecord(
            name="bincount", url="http://127.0.0.1:8080", model_uri=spec(1).model_uri, version="0123456789ab",
            arch="resnet18", image_size=64, classes=[1, 2, 3, 4, 5], backend="local",
            deployed_at="2026-11-30T19:00:00+00:00",
        )
    )  # fmt: skip

    main(["models", "list"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "VERSION", "STAGE", "APPROVAL", "ACCURACY", "RMSE", "WITHIN-1", "CREATED", "(UTC)", "TRAINING", "JOB",
        "SERVED", "BY", "HOLD",
    ]  # fmt: skip
    assert lines[2].split()[:4] == ["bincount:1", "candidate", "PendingManualApproval", "0.510"]
    assert lines[2].split()[-2:] == ["bincount", "-"] and lines[3].split()[-2:] == ["-", "-"]

    main(["models", "approve", "bincount:1", "--reason", "looks right", "--actor", "alice"])
    approved = capsys.readouterr().out.strip()
    assert approved.endswith("bincount:1 is Approved (stage candidate)"), "no run waits: approved in the registry"
    main(["models", "show", "bincount:1"])
    shown = capsys.readouterr().out
    for expected in (
        "dataset       file:///datasets/abid/split.csv",
        "training job  bincount-final-0000000001",
        "--batch-size 32",
        f"flow run    {uuid.UUID(int=1)}  http://127.0.0.1:4200/runs/flow-run/{uuid.UUID(int=1)}",
        "model         file:///models/job-1/output/model.tar.gz",
        "endpoint      bincount  http://127.0.0.1:8080  (local",
    ):
        assert expected in shown
    assert shown.splitlines()[-1].split()[1:] == ["alice", "approval", "Approved", "looks", "right"]
    artifact = Artifact.get(f"model-registry-{GROUP}")
    assert artifact is not None and "Approved" in str(artifact.data), "the UI's registry table follows the CLI"
    wait_until(
        lambda: any(e.payload["actor"] == "alice" for e in approval_events("bincount.model.approved")),
        timeout_s=15,
        what="the approval event",
    )

    main(["models", "reject", "bincount:2", "--reason", "miscounts 5s"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["models", "approve", "bincount:2", "--reason", "second thoughts"])
    assert exit_.value.code == 2
    assert "bincount models approve: bincount:2 was rejected" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["models", "show", "bincount/2"])
    assert "write <group>:<number>" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["models", "rollback", "bincount", "--reason", "bad"])
    assert "no earlier production version to roll back to" in capsys.readouterr().err


def test_models_rollback_deploys_the_previous_production_version(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bincount.local.serving import LocalServingBackend, runtime_client
    from bincount.models import write_untrained_model_dir
    from flows.cli import main

    monkeypatch.setenv("BINCOUNT_ARTIFACT_ROOT", (tmp_path / "artifacts").as_uri())
    settings = Settings.load()
    registry = StorageModelRegistry.from_settings(settings)
    backend = LocalServingBackend(settings)
    endpoint = "rollback-cli"
    for n in (1, 2):
        model = write_untrained_model_dir(tmp_path / f"model-{n}", "resnet18", 32, seed=n).as_uri()
        registry.register(endpoint, spec(n, model_uri=model))
        registry.approve(endpoint, n, "alice", "ok")
        registry.transition(endpoint, n, "production", "pipeline", f"deployed v{n}")
    try:
        record = backend.deploy(endpoint, registry.get(endpoint, 2).model_uri, f"{endpoint}:2")
        photo = jpeg_bytes(render_bin_image(2, np.random.default_rng(0), 32))
        stop, answered, failures = threading.Event(), [], []

        def client_load() -> None:  # boto3's own client, as users call the endpoint, during the whole rollback
            runtime = runtime_client(record.url, max_attempts=1)
            while not stop.is_set():
                try:
                    runtime.invoke_endpoint(EndpointName=endpoint, Body=photo, ContentType="image/jpeg")["Body"].read()
                    answered.append(1)
                except Exception as error:
                    failures.append(repr(error))

        clients = [threading.Thread(target=client_load) for _ in range(4)]
        for thread in clients:
            thread.start()
        try:
            main(["models", "rollback", endpoint, "--reason", "v2 too slow", "--actor", "bob"])
        finally:
            stop.set()
            for thread in clients:
                thread.join()
        assert failures == [] and len(answered) > 10
        assert capsys.readouterr().out.startswith(f"Endpoint {endpoint!r} serves {endpoint}:1 again")
        served = backend.describe(endpoint)
        assert served.model_uri == registry.get(endpoint, 1).model_uri and served.model_ref == f"{endpoint}:1"
        assert served.previous_model_ref == f"{endpoint}:2"
        assert registry.production(endpoint).version == 1 and registry.get(endpoint, 2).stage == "archived"
        assert registry.get(endpoint, 1).history[-1].details == {"rollback_from": "2"}
        assert registry.get(endpoint, 1).history[-1].actor == "bob"
        assert registry.get(endpoint, 2).hold.reason == "v2 too slow", "(e): the version rolled back from is held"
    finally:
        backend.delete(endpoint)
