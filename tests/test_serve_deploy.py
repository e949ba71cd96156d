"""The deploy tasks in a Prefect flow: deploy and check in one transaction, rolled back on failure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow
from prefect.artifacts import Artifact

from bincount.config import Settings
from bincount.contracts.serving import EndpointNotFoundError, EndpointRecord
from bincount.local.serving import LocalServingBackend
from bincount.models import write_untrained_model_dir
from tasks.deploy import deploy_model, endpoint_artifact_key


@flow(name="deploy-for-test")
def deploy_flow(
    artifact_root: str, endpoint_name: str, model_uri: str, sample_image_uri: str | None = None
) -> EndpointRecord:
    return deploy_model(Settings.load(artifact_root=artifact_root), endpoint_name, model_uri, sample_image_uri)


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

    with pytest.raises(Exception, match="ModelError|not a JPEG"):
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
    with pytest.raises(Exception, match="ModelError|not a"):
        deploy_flow(artifact_root, "fresh-ep", model, corrupt.as_uri())
    with pytest.raises(EndpointNotFoundError):
        LocalServingBackend(Settings.load(artifact_root=artifact_root)).describe("fresh-ep")
