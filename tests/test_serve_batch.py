"""Batch transform through the Prefect flow: real ABID photos plus one corrupt image; a rerun resumes."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prefect import get_client
from prefect.artifacts import Artifact
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from waiting import wait_until

from bincount import batch_results
from bincount.batch_results import write_tables
from bincount.config import Location, Settings
from bincount.contracts.serving import BatchTransformError, BatchTransformSummary
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.local.serving import LocalServingBackend
from bincount.manifest import parse_manifest
from bincount.models import pack_folder, write_untrained_model_dir
from bincount.storage import Storage
from flows.batch_transform import batch_transform
from tasks.batch_transform import SUMMARY_KEY, scoring_sentence

PER_CLASS = 4


@pytest.fixture(scope="module")
def channel(abid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A channel-layout folder (``<count>/<id>.jpg``) of real photos, and one corrupt JPEG."""
    root = tmp_path_factory.mktemp("channel") / "test"
    manifest = parse_manifest((abid_dir / "file_list.sample.json").read_text())
    for count in (1, 2, 3, 4, 5):
        ids = [image_id for image_id, label in manifest.items() if label == count][:PER_CLASS]
        (root / str(count)).mkdir(parents=True)
        for image_id in ids:
            shutil.copy(abid_dir / "bucket" / "bin-images" / f"{image_id}.jpg", root / str(count) / f"{image_id}.jpg")
    good = next((root / "3").iterdir()).read_bytes()
    (root / "3" / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    (root / "notes.txt").write_text("not an image: not a record")
    return root


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("model")
    return pack_folder(write_untrained_model_dir(root / "m", "resnet18", 32, seed=4), root / "model.tar.gz").as_uri()


def test_batch_transform_scores_every_good_image_reports_the_bad_and_resumes(
    prefect_server: None, channel: Path, model_uri: str, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    artifacts = tmp_path / "artifacts"
    state = batch_transform(
        input_uri=channel.as_uri(),
        output_uri=str(output),
        model_uri=model_uri,
        batch_size=8,
        location=Location(artifact_root=str(artifacts)),
        return_state=True,
    )
    summary = state.result()
    good = 5 * PER_CLASS
    assert (summary.images, summary.scored, summary.skipped, summary.failed) == (good + 1, good, 0, 1)
    assert summary.errors[0]["key"] == "3/corrupt.jpg" and "JPEG" in summary.errors[0]["error"]

    outs = sorted(path.relative_to(output).as_posix() for path in output.rglob("*.out"))
    assert len(outs) == good and "3/corrupt.jpg.out" not in outs
    first = json.loads((output / outs[0]).read_text())["predictions"][0]
    assert first["predicted_count"] in (1, 2, 3, 4, 5)

    table = pd.read_csv(output / "results.csv", dtype={"id": str})
    assert len(table) == good and set(table["label"]) == {1, 2, 3, 4, 5}
    assert (table["predicted_count"].between(1, 5)).all()
    assert table[[f"prob_{count}" for count in range(1, 6)]].sum(axis=1).round(3).eq(1.0).all()
    assert summary.accuracy == pytest.approx((table["predicted_count"] == table["label"]).mean(), abs=1e-4)
    errors = pd.read_csv(output / "errors.csv")
    assert list(errors["key"]) == ["3/corrupt.jpg"]
    with get_client(sync_client=True) as client:
        shown = {
            artifact.key: artifact
            for artifact in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
                )
            )
        }
    assert f"| output | `{output.as_uri()}` |" in shown["batch-transform-summary"].data
    assert f"| scored now | {good} (" in shown["batch-transform-summary"].data
    assert f"(version `{summary.model_version}`)" in shown["batch-transform-summary"].data
    assert "3/corrupt.jpg" in str(shown["batch-transform-errors"].data)
    assert shown["batch-transform-progress"].data == 100.0

    written = {path: path.stat().st_mtime_ns for path in output.rglob("*.out")}
    again = batch_transform(
        input_uri=channel.as_uri(),
        output_uri=str(output),
        model_uri=model_uri,
        batch_size=8,
        location=Location(artifact_root=str(artifacts)),
    )
    assert (again.scored, again.skipped, again.failed) == (0, good, 1)
    assert {path: path.stat().st_mtime_ns for path in output.rglob("*.out")} == written  # nothing recomputed
    assert pd.read_csv(output / "results.csv", dtype={"id": str}).equals(table)


def test_batch_transform_with_labels_from_a_csv(channel: Path, model_uri: str, tmp_path: Path) -> None:
    settings = Settings.load(artifact_root=str(tmp_path / "artifacts"))
    labels = tmp_path / "split.csv"
    ids = [path.stem for path in channel.rglob("*.jpg") if path.stem != "corrupt"]
    pd.DataFrame({"id": ids, "label": [5] * len(ids)}).to_csv(labels, index=False)
    summary = LocalServingBackend(settings).batch_transform(
        model_uri, channel.as_uri(), (tmp_path / "out").as_uri(), batch_size=16, labels_uri=labels.as_uri()
    )
    table = pd.read_csv(io.BytesIO(Storage().read_bytes(summary.results_uri)))
    assert set(table["label"]) == {5}
    assert summary.accuracy == pytest.approx((table["predicted_count"] == 5).mean(), abs=1e-4)


def test_overlapping_prefixes_are_refused(channel: Path, model_uri: str, tmp_path: Path) -> None:
    backend = LocalServingBackend(Settings.load(artifact_root=str(tmp_path / "artifacts")))
    with pytest.raises(BatchTransformError, match="overlap"):
        backend.batch_transform(model_uri, channel.as_uri(), (channel / "out").as_uri())


def test_batch_transform_between_s3_prefixes(
    channel: Path, model_uri: str, s3_server, s3_client, tmp_path: Path
) -> None:
    s3_client.create_bucket(Bucket="serve-batch")
    photos = sorted(channel.glob("[12]/*.jpg"))
    for path in photos:
        s3_client.upload_file(str(path), "serve-batch", f"in/{path.parent.name}/{path.name}")
    settings = Settings.load(artifact_root=str(tmp_path / "artifacts"), s3_endpoint_url=s3_server.endpoint_url)
    summary = LocalServingBackend(settings).batch_transform(
        model_uri, "s3://serve-batch/in", "s3://serve-batch/out", batch_size=4
    )
    assert (summary.scored, summary.failed) == (len(photos), 0)
    keys = {item["Key"] for item in s3_client.list_objects_v2(Bucket="serve-batch", Prefix="out/")["Contents"]}
    assert keys == {f"out/{p.parent.name}/{p.name}.out" for p in photos} | {"out/results.csv", "out/model.json"}
    table = pd.read_csv(io.BytesIO(s3_client.get_object(Bucket="serve-batch", Key="out/results.csv")["Body"].read()))
    assert sorted(table["label"].unique()) == [1, 2]


@pytest.fixture(scope="module")
def small_channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic photos in channel layout (no real sample needed)."""
    root = tmp_path_factory.mktemp("small") / "test"
    for count in (1, 2, 3):
        (root / str(count)).mkdir(parents=True)
        for index in range(2):
            photo = render_bin_image(count, np.random.default_rng(10 * count + index), size=48)
            (root / str(count) / f"p{count}{index}.jpg").write_bytes(jpeg_bytes(photo))
    return root


def test_a_resume_with_another_model_is_refused_and_rescoring_is_explicit(small_channel: Path, tmp_path: Path) -> None:
    backend = LocalServingBackend(Settings.load(artifact_root=str(tmp_path / "artifacts")))
    models = [write_untrained_model_dir(tmp_path / f"m{seed}", "resnet18", 32, seed=seed).as_uri() for seed in (1, 2)]
    output = tmp_path / "out"
    first = backend.batch_transform(models[0], small_channel.as_uri(), output.as_uri())
    table = pd.read_csv(output / "results.csv", dtype={"model_version": str})
    assert set(table["model_version"]) == {first.model_version}
    (output / "3" / "p30.jpg.out").unlink()  # as if the first run had been cut short

    with pytest.raises(
        BatchTransformError,
        match=rf"holds 5 predictions of model {first.model_version}, not of model [0-9a-f]{{12}}: .*rescore=True",
    ):
        backend.batch_transform(models[1], small_channel.as_uri(), output.as_uri())
    assert pd.read_csv(output / "results.csv", dtype={"model_version": str}).equals(table)

    second = backend.batch_transform(models[1], small_channel.as_uri(), output.as_uri(), rescore=True)
    assert second.model_version != first.model_version
    assert (second.scored, second.skipped) == (6, 0)
    rescored = pd.read_csv(output / "results.csv", dtype={"model_version": str})
    assert len(rescored) == 6 and set(rescored["model_version"]) == {second.model_version}
    assert json.loads((output / "model.json").read_text()) == {"model_version": second.model_version}


def test_input_keys_that_climb_out_of_the_output_are_reported_not_written(
    small_channel: Path, s3_server, s3_client, tmp_path: Path
) -> None:
    s3_client.create_bucket(Bucket="batch-escape")
    for path in sorted(small_channel.glob("1/*.jpg")):
        s3_client.upload_file(str(path), "batch-escape", f"in/1/{path.name}")
    s3_client.upload_file(str(path), "batch-escape", "in/1/../../evil.jpg")
    settings = Settings.load(artifact_root=str(tmp_path / "artifacts"), s3_endpoint_url=s3_server.endpoint_url)
    model = write_untrained_model_dir(tmp_path / "m", "resnet18", 32, seed=3).as_uri()
    output = tmp_path / "deep" / "out"
    summary = LocalServingBackend(settings).batch_transform(model, "s3://batch-escape/in", output.as_uri())
    assert (summary.images, summary.scored, summary.failed) == (3, 2, 1)
    assert summary.errors[0]["key"] == "1/../../evil.jpg" and "not a plain relative key" in summary.errors[0]["error"]
    assert not list(tmp_path.rglob("evil*"))


def test_a_rerun_with_everything_done_says_so_rather_than_zero_scored(
    prefect_server: None, small_channel: Path, model_uri: str, tmp_path: Path
) -> None:
    def run() -> BatchTransformSummary:
        return batch_transform(
            input_uri=small_channel.as_uri(),
            output_uri=str(tmp_path / "out"),
            model_uri=model_uri,
            location=Location(artifact_root=str(tmp_path / "artifacts")),
        )

    assert scoring_sentence(run()) == "6 of 6 scored"
    again = run()
    assert (again.scored, again.skipped, scoring_sentence(again)) == (0, 6, "all 6 already scored: nothing to do")
    artifact = Artifact.get(SUMMARY_KEY)
    assert artifact is not None and str(artifact.data).startswith("### Batch transform: all 6 already scored")
    summary = wait_until(lambda: Artifact.get("summary-batch-transform"), what="the run summary")
    assert "| outcome | all 6 already scored: nothing to do |" in str(summary.data), summary.data


def test_results_written_a_chunk_at_a_time_are_the_table_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``results.csv`` from 11 ``.out`` files, 3 rows at a time, is byte for byte the one-piece table."""
    storage, output = Storage(), tmp_path / "out"
    keys = [f"{count}/p{n}.jpg" for n in range(11) for count in [1 + n % 5]]
    for n, key in enumerate(keys):
        answer = {"predictions": [{"predicted_count": 1 + n % 3, "probabilities": {str(c): 0.2 for c in range(1, 6)}}]}
        (output / f"{key}.out").parent.mkdir(parents=True, exist_ok=True)
        (output / f"{key}.out").write_text(json.dumps(answer))
    whole = write_tables(
        storage, output.as_uri(), keys, labels=None, classes=[1, 2, 3, 4, 5], errors=[], model_version="m:1"
    )
    table = (output / "results.csv").read_bytes()
    monkeypatch.setattr(batch_results, "_ROWS_AT_ONCE", 3)
    assert (
        write_tables(
            storage, output.as_uri(), keys, labels=None, classes=[1, 2, 3, 4, 5], errors=[], model_version="m:1"
        )
        == whole
    )
    assert (output / "results.csv").read_bytes() == table
    assert len(pd.read_csv(output / "results.csv")) == 11 and whole[2] == round(3 / 11, 4)  # ids 0, 1 and 2 right
