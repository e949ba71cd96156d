"""The prepare-data flow end to end on a real Prefect server and a real S3 API on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import Artifact

from bincount.config import Location
from bincount.demo_data import generate_demo_bucket
from bincount.manifest import dump_manifest
from bincount.split import SPLITS, read_split, split_dataset
from bincount.storage import Storage, file_digest, local_path
from bincount.upload import sync_channels
from flows.data import DataOptions, PreparedData, prepare_data


def task_states(flow_run_id: UUID) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def run_artifacts(flow_run_id: UUID) -> dict[str, Artifact]:
    """The artifacts one flow run made, by key (table data parsed)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    for artifact in found:
        if artifact.type == "table" and isinstance(artifact.data, str):
            artifact.data = json.loads(artifact.data)
    return {artifact.key: artifact for artifact in found}


@pytest.fixture
def env(monkeypatch, s3_server, tmp_path: Path) -> Path:
    monkeypatch.setenv("BINCOUNT_DATA_DIR", str(tmp_path / "raw"))
    monkeypatch.setenv("BINCOUNT_S3_ENDPOINT_URL", s3_server.endpoint_url)
    return tmp_path


def test_real_images_from_s3_to_channels_then_served_from_cache(
    prefect_server, env: Path, abid_bucket: dict[str, int]
) -> None:
    artifacts = env / "artifacts"
    state = prepare_data(
        location=Location(source_uri="s3://abid-sample", artifact_root=str(artifacts)), return_state=True
    )
    result = state.result()
    table = read_split(Storage(), result.split_uri)
    assert len(table) == len(abid_bucket) == result.images
    assert table.groupby("id")["split"].nunique().max() == 1
    shares = table["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.8, abs=0.01) and shares["test"] == pytest.approx(0.1, abs=0.01)
    assert (table.groupby("split")["label"].nunique() == 5).all(), "every count on every side"
    assert dict(zip(table["id"], table["label"], strict=True)) == abid_bucket
    for row in table.itertuples():
        channel_file = local_path(result.channels[row.split]) / str(row.label) / f"{row.id}.jpg"
        assert file_digest(channel_file) == row.sha256
    assert all(0.0 < value < 1.0 for value in (*result.mean, *result.std))

    rerun = prepare_data(
        location=Location(source_uri="s3://abid-sample", artifact_root=str(artifacts)), return_state=True
    )
    states = task_states(rerun.state_details.flow_run_id)
    assert {states[name] for name in ("download-images", "validate-data", "report-data")} == {"Cached"}
    assert states["split-dataset"] == "Completed", "the split reads the placement record: never cached"
    assert rerun.result() == result

    # A wiped dataset folder with Prefect's cache still there: the split and validation are written again.
    split_file = local_path(result.split_uri)
    validation_file = split_file.with_name("validation.json")
    split_file.unlink()
    validation_file.unlink()
    rewritten = prepare_data(
        location=Location(source_uri="s3://abid-sample", artifact_root=str(artifacts)), return_state=True
    )
    states = task_states(rewritten.state_details.flow_run_id)
    assert (states["split-dataset"], states["validate-data"]) == ("Completed", "Completed")
    assert split_file.is_file() and validation_file.is_file()
    assert read_split(Storage(), result.split_uri).equals(table), "the record keeps every side: the same split again"

    refreshed = prepare_data(
        location=Location(source_uri="s3://abid-sample", artifact_root=str(artifacts)), refresh=True, return_state=True
    )
    assert task_states(refreshed.state_details.flow_run_id)["download-images"] == "Completed"

    shown = run_artifacts(state.state_details.flow_run_id)
    assert f"mean {result.mean}, std {result.std}" in shown["data-report"].data
    assert "data:image/png;base64," in shown["data-report"].data
    assert sum(row["train"] for row in shown["data-class-counts"].data) == (table["split"] == "train").sum()
    assert shown["download-progress"].type == "progress" and shown["download-progress"].data == 100.0


def test_a_manifest_that_shrinks_then_grows_moves_no_id_and_each_run_leaves_its_view(
    prefect_server, env: Path, abid_bucket: dict[str, int]
) -> None:
    """Two thirds of the images, then a third (as an ids file or a partial manifest would), then the two thirds
    again (the same inputs as the first run), then all: no id changes side, and each run leaves its own view."""
    location = Location(source_uri="s3://abid-sample", artifact_root=str(env / "artifacts"))
    storage = Storage()
    by_class: dict[int, list[str]] = {}
    for image_id, label in abid_bucket.items():
        by_class.setdefault(label, []).append(image_id)

    def prepare(share: float) -> tuple[PreparedData, dict[str, str]]:
        manifest = {i: label for label, ids in by_class.items() for i in ids[: int(len(ids) * share)]}
        path = env / f"manifest-{share}.json"
        path.write_bytes(dump_manifest(manifest))
        state = prepare_data(DataOptions(manifest_uri=str(path)), location, return_state=True)
        result = state.result()
        view = read_split(storage, result.split_uri)
        assert len(view) == len(manifest) == result.images
        train_channel = {local_path(info.uri).stem for info in storage.list(result.channels["train"])}
        assert train_channel == set(view["id"][view["split"] == "train"]), "the channels hold this view"
        return result, dict(zip(view["id"], view["split"].astype(str), strict=True))

    first, sides = prepare(2 / 3)
    validation_file = local_path(first.split_uri).with_name("validation.json")
    accepted = json.loads(validation_file.read_text())["statistics"]
    _, shrunk = prepare(1 / 3)
    assert shrunk == {i: sides[i] for i in shrunk}
    _, again = prepare(2 / 3)
    assert again == sides, "split.csv is this run's view, with every side as first placed"
    assert json.loads(validation_file.read_text())["statistics"] == accepted, "validation.json: this view's"
    _, grown = prepare(1.0)
    moved = {i for i in sides if grown[i] != sides[i]}
    assert not moved, f"{len(moved)} images changed side"


def test_demo_data_round_trips_through_s3_and_the_flow(prefect_server, env: Path, s3_server, s3_client) -> None:
    """As `bincount demo` with an s3:// artifact root: the demo bucket is private, in the artifact
    root's bucket, and read with the project's credentials although sources default to anonymous."""
    s3_client.create_bucket(Bucket="demo-roundtrip")
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url)
    manifest_uri = generate_demo_bucket(storage, "s3://demo-roundtrip", images=120, seed=7, size=96)
    result = prepare_data(
        DataOptions(manifest_uri=manifest_uri, dataset="demo"),
        Location(source_uri="s3://demo-roundtrip", artifact_root="s3://demo-roundtrip/artifacts"),
    )
    assert result.channels["train"] == "s3://demo-roundtrip/artifacts/datasets/demo/channels/train"
    table = read_split(storage, result.split_uri)
    listed = {
        info.uri.rsplit("/", 3)[-3:][0] for info in storage.list("s3://demo-roundtrip/artifacts/datasets/demo/channels")
    }
    assert listed == set(SPLITS)
    assert sum(1 for _ in storage.list(result.channels["test"])) == (table["split"] == "test").sum()


def test_demo_generator_is_deterministic_by_seed(tmp_path: Path) -> None:
    storage = Storage()
    first = generate_demo_bucket(storage, (tmp_path / "a").as_uri(), images=20, seed=3, size=64)
    second = generate_demo_bucket(storage, (tmp_path / "b").as_uri(), images=20, seed=3, size=64)
    other = generate_demo_bucket(storage, (tmp_path / "c").as_uri(), images=20, seed=4, size=64)
    assert storage.read_bytes(first) == storage.read_bytes(second) != storage.read_bytes(other)
    for name in ("bin-images/00005.jpg", "metadata/00005.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_sync_copies_only_what_changed_and_removes_what_moved(
    s3_server, s3_client, abid_bucket, tmp_path: Path
) -> None:
    from bincount.download import download_images

    storage = Storage(s3_endpoint_url=s3_server.endpoint_url)
    manifest = dict(list(abid_bucket.items())[::3])
    _, downloaded = download_images(manifest, "s3://abid-sample", tmp_path, storage, with_metadata=False)
    s3_client.create_bucket(Bucket="channels-sync")
    channels = "s3://channels-sync/channels"
    first = split_dataset(manifest, downloaded, "s3://abid-sample", seed=0)
    assert sync_channels(first, tmp_path, storage, channels).copied == len(first)
    unchanged = sync_channels(first, tmp_path, storage, channels)
    assert (unchanged.copied, unchanged.deleted, unchanged.unchanged) == (0, 0, len(first))

    second = split_dataset(manifest, downloaded, "s3://abid-sample", seed=1)
    moved = int((first.set_index("id")["split"] != second.set_index("id").loc[first["id"], "split"]).sum())
    report = sync_channels(second, tmp_path, storage, channels)
    assert report.copied == report.deleted == moved > 0
    where = {}
    for info in storage.list(channels):
        split, _label, name = info.uri.rsplit("/", 3)[-3:]
        assert name.removesuffix(".jpg") not in where, "an image on two sides"
        where[name.removesuffix(".jpg")] = split
    assert where == dict(zip(second["id"], second["split"].astype(str), strict=True))


def test_split_is_stratified_and_seeded() -> None:
    from bincount.download import DownloadedImage

    rng = np.random.default_rng(0)
    manifest = {f"{i:05d}": int(rng.integers(1, 6)) for i in range(500)}
    downloaded = {i: DownloadedImage(i, "0" * 64, 1) for i in manifest}
    a = split_dataset(manifest, downloaded, "s3://x")
    assert a.equals(split_dataset(manifest, downloaded, "s3://x"))
    assert not a.equals(split_dataset(manifest, downloaded, "s3://x", seed=1))
    per_class = a.groupby(["label", "split"], observed=True).size().unstack()
    assert ((per_class["train"] / per_class.sum(axis=1)).between(0.78, 0.82)).all()


def test_a_manifest_given_as_a_path_is_read_as_a_file_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A UI form or ``--param`` gives a plain path; storage reads URIs."""
    from pydantic import ValidationError

    monkeypatch.chdir(tmp_path)
    assert DataOptions(manifest_uri="lists/file_list.json").manifest_uri == (tmp_path / "lists/file_list.json").as_uri()
    assert DataOptions(manifest_uri="s3://bucket/file_list.json").manifest_uri == "s3://bucket/file_list.json"
    with pytest.raises(ValidationError, match="only file:// and s3:// are supported"):
        DataOptions(manifest_uri="https://example.com/file_list.json")
