"""The deploy tasks in a Prefect flow: deploy and check in one transaction, rolled back on failure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow
from prefect.artifacts import Artifact
from waiting import wait_until

from bincount.code import code_hash
from bincount.config import Settings
from bincount.contracts.registry import DatasetRef, ModelMetrics, ModelVersionSpec
from bincount.contracts.serving import BatchTransformSummary, EndpointNotFoundError, EndpointRecord, RolloutStrategy
from bincount.endpoints import smoke_image
from bincount.evaluation import Evaluation
from bincount.factory import get_model_registry
from bincount.local.serving import LocalServingBackend
from bincount.models import write_untrained_model_dir
from bincount.storage import file_digest, local_path
from flows.cli import main as cli
from tasks.deploy import deploy_model, endpoint_artifact_key


@flow(name="deploy-for-test")
def deploy_flow(
    artifact_root: str,
    endpoint_name: str,
    model_uri: str,
    sample_image_uri: str | None = None,
    strategy: RolloutStrategy | None = None,
) -> EndpointRecord:
    """Register ``model_uri`` as a version of the endpoint's group, then deploy and check it, as the pipeline does."""
    settings = Settings.load(artifact_root=artifact_root)
    metrics = ModelMetrics(accuracy=0.5, rmse=1.0, within_one_accuracy=0.8, per_class_accuracy={"1": 0.5})
    spec = ModelVersionSpec(
        model_uri=model_uri,
        model_sha256=file_digest(local_path(model_uri) / "model.pt"),
        metrics=metrics,
        dataset=DatasetRef("file:///split.csv", "0" * 64, {"test": 1}),
        code_hash=code_hash(),
        hyperparameters={},
        training_job="test",
    )
    version = get_model_registry(settings).register(endpoint_name, spec)
    return deploy_model(settings, endpoint_name, version, sample_image_uri, strategy=strategy)


@pytest.fixture(scope="module")
def artifact_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("artifacts")
    yield str(root)
    backend = LocalServingBackend(Settings.load(artifact_root=str(root)))
    for record in (root / "endpoints").glob("*.json"):
        backend.delete(record.stem)


def test_a_failed_check_rolls_the_endpoint_back_to_the_previous_model(
    prefect_server: None, artifact_root: str, abid_dir: Path, tmp_path: Path
) -> None:
    first = write_untrained_model_dir(tmp_path / "first", "resnet18", 32, seed=5).as_uri()
    second = write_untrained_model_dir(tmp_path / "second", "resnet18", 32, seed=6).as_uri()
    photo = (abid_dir / "bucket" / "bin-images" / "01001.jpg").as_uri()
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")

    deployed = deploy_flow(artifact_root, "rollback-ep", first, photo)
    backend = LocalServingBackend(Settings.load(artifact_root=artifact_root))
    assert backend.describe("rollback-ep").version == deployed.version

    with pytest.raises(Exception, match=r"ModelError|not a JPEG"):
        deploy_flow(artifact_root, "rollback-ep", second, corrupt.as_uri())  # deploys, then the check fails

    after = backend.describe("rollback-ep")
    assert after.version == deployed.version and after.model_uri == first
    assert after.url == deployed.url
    answer = json.loads(backend.invoke("rollback-ep", Path(photo.removeprefix("file://")).read_bytes(), "image/jpeg"))
    assert answer["predictions"][0]["predicted_count"] in (1, 2, 3, 4, 5)
    artifact = Artifact.get(endpoint_artifact_key("rollback-ep"))
    assert artifact is not None and "Rolled back" in artifact.data and deployed.version in artifact.data

    backend.delete("rollback-ep")
    with pytest.raises(EndpointNotFoundError):
        backend.describe("rollback-ep")


def test_a_new_endpoint_that_fails_its_check_is_removed(
    prefect_server: None, artifact_root: str, tmp_path: Path
) -> None:
    model = write_untrained_model_dir(tmp_path / "model", "resnet18", 32, seed=7).as_uri()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(Exception, match=r"ModelError|not a"):
        deploy_flow(artifact_root, "fresh-ep", model, corrupt.as_uri())
    with pytest.raises(EndpointNotFoundError):
        LocalServingBackend(Settings.load(artifact_root=artifact_root)).describe("fresh-ep")


def test_a_shadow_deployed_by_a_flow_is_reported_then_promoted_with_events_and_artifact(
    prefect_server: None,
    artifact_root: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from test_pipeline import events_named

    first = write_untrained_model_dir(tmp_path / "first", "resnet18", 32, seed=8).as_uri()
    second = write_untrained_model_dir(tmp_path / "second", "resnet18", 32, seed=9).as_uri()
    deploy_flow(artifact_root, "shadow-ep", first)
    shadow = RolloutStrategy(
        kind="shadow",
        traffic_percent=100,
        bake_seconds=1,
        min_requests=3,
        max_latency_ratio=100,
        max_error_rate_increase=0.9,  # a coarse sensitivity: a handful of copies is enough evidence here
    )
    shadowing = deploy_flow(artifact_root, "shadow-ep", second, strategy=shadow)
    assert shadowing.model_uri == first and shadowing.rollout and shadowing.rollout.verdict == "shadowing"
    artifact = Artifact.get(endpoint_artifact_key("shadow-ep"))
    assert artifact is not None and "shadow: a copy of 100%" in artifact.data and "**shadowing**" in artifact.data
    backend = LocalServingBackend(Settings.load(artifact_root=artifact_root))
    for _ in range(5):
        backend.invoke("shadow-ep", smoke_image(32), "image/jpeg")
    wait_until(lambda: backend.shadow_report("shadow-ep").compared >= 5, what="the 5 shadow copies to be answered")

    registry = get_model_registry(Settings.load(artifact_root=artifact_root))
    assert shadowing.shadow is not None and shadowing.shadow.model_ref
    candidate = registry.resolve(shadowing.shadow.model_ref)
    registry.approve(candidate.group, candidate.version, "tester", "approved while it shadows")

    monkeypatch.setenv("BINCOUNT_ARTIFACT_ROOT", artifact_root)
    cli(["endpoints", "promote-shadow", "shadow-ep"])  # runs the promote-shadow flow
    assert "serves shadow-ep:2; the shadow's report: 6 answers compared" in capsys.readouterr().out
    promoted = backend.describe("shadow-ep")
    assert promoted.model_uri == second and backend.describe("shadow-ep").model_uri == second
    report = promoted.rollout.report if promoted.rollout else None
    assert report is not None and report.compared == 5 + 1 and report.promote is True, (
        report
    )  # and check-endpoint's request
    artifact = Artifact.get(endpoint_artifact_key("shadow-ep"))
    assert artifact is not None and "**promoted**" in artifact.data and promoted.model_ref in artifact.data
    resource = "bincount.endpoint.shadow-ep"
    for name in ("shadowing", "shadow-report", "promoted", "step"):
        assert events_named(f"bincount.endpoint.rollout.{name}", where=lambda e: e.resource.id == resource), name
    assert registry.resolve(promoted.model_ref).stage == "production"

    with pytest.raises(SystemExit):
        cli(["endpoints", "stop-shadow", "shadow-ep"])
    assert "bincount endpoints stop-shadow: endpoint 'shadow-ep' has no shadow running" in capsys.readouterr().err


@pytest.fixture(scope="module")
def snippet_endpoint(
    prefect_server: None, artifact_root: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EndpointRecord]:
    """A real local endpoint, deployed by a flow (so its artifact is written)."""
    model = write_untrained_model_dir(tmp_path_factory.mktemp("snippet") / "model", "resnet18", 32, seed=10)
    yield deploy_flow(artifact_root, "snippet-ep", model.as_uri())
    LocalServingBackend(Settings.load(artifact_root=artifact_root)).delete("snippet-ep")


def run_snippet(code: str, abid_dir: Path, folder: Path) -> dict:
    """Run ``code`` as a user would paste it: in a fresh interpreter, beside a photo at ``photo.jpg``, with no AWS
    settings at all (the test session sets dummy ones, which would hide a missing region); returns its answer."""
    folder.mkdir()
    (folder / "photo.jpg").write_bytes((abid_dir / "bucket" / "bin-images" / "01001.jpg").read_bytes())
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env |= {"AWS_CONFIG_FILE": str(folder / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(folder / "none")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_the_endpoint_artifacts_invoke_snippet_runs_as_shown(
    snippet_endpoint: EndpointRecord, abid_dir: Path, tmp_path: Path
) -> None:
    artifact = Artifact.get(endpoint_artifact_key(snippet_endpoint.name))
    assert artifact is not None
    snippet = re.search(r"```python\n(.*?)\n```", str(artifact.data), re.DOTALL)
    assert snippet is not None, artifact.data
    answer = run_snippet(snippet.group(1), abid_dir, tmp_path / "client")
    assert answer["predictions"][0]["predicted_count"] in (1, 2, 3, 4, 5)


def test_the_snippet_bincount_demo_prints_runs_as_shown(
    snippet_endpoint: EndpointRecord, abid_dir: Path, tmp_path: Path
) -> None:
    from flows.cli import demo_report
    from flows.pipeline import PipelineResult

    evaluation = Evaluation(
        images=1, accuracy=1.0, rmse=0.0, within_one_accuracy=1.0, per_class_accuracy={"1": 1.0}, classes=[1],
        confusion=[[1]],
    )  # fmt: skip
    scored = BatchTransformSummary(
        input_uri="file:///test", output_uri="file:///out", model_version=snippet_endpoint.version, images=57,
        scored=0, skipped=57, failed=0, seconds=0.1, images_per_s=0.0, results_uri="file:///out/results.csv",
        errors_uri=None, accuracy=None,
    )  # fmt: skip
    printed = demo_report(
        PipelineResult(
            dataset_split_uri="file:///split.csv",
            model_uri=snippet_endpoint.model_uri,
            model_version="snippet-ep:1",
            evaluation=evaluation,
            endpoint=snippet_endpoint,
            batch_transform=scored,
        )
    )
    assert "Batch transform of the test split: all 57 already scored: nothing to do" in printed
    snippet = printed[printed.index("import boto3") :].split("\n\n", 2)
    answer = run_snippet("\n\n".join(snippet[:2]), abid_dir, tmp_path / "client")
    assert answer["predictions"][0]["predicted_count"] in (1, 2, 3, 4, 5)
