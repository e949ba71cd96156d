"""Feedback from production: real capture files (the capture writer's), a real demo bucket, a real Prefect server.

Harvesting labelled traffic adds exactly the new labelled photos, once; a manifest version records their lineage;
unsafe InferenceIds and out-of-range labels are refused and named; the labelling queue takes the most uncertain
photos, one per near-duplicate; Label Studio's export comes back as new images; the stable split places them
without moving an old id; the Prefect UI form answers the queue.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.flow_runs import resume_flow_run
from prefect.input.actions import read_flow_run_input
from waiting import wait_until

from bincount.capture import CaptureWriter, Exchange, capture_prefix
from bincount.config import Location, Settings
from bincount.contracts.serving import CaptureConfig
from bincount.demo_data import generate_demo_bucket, jpeg_bytes, render_bin_image
from bincount.download import download_images
from bincount.feedback import (
    Harvest,
    feedback_base,
    feedback_uri,
    harvest,
    label_studio_config,
    latest_version,
    open_queue,
    photo_id,
    record_version,
)
from bincount.manifest import read_manifest
from bincount.split import read_placements, record_split
from bincount.storage import Storage
from flows.harvest import export_label_queue, harvest_feedback, import_label_answers, label_feedback

ENDPOINT = "shop"
DATASET = "abid"
FRACTIONS = (0.5, 0.25, 0.25)


@dataclass
class World:
    """An original bucket, its dataset split once (as the data stage does), a labels bucket and an artifact root."""

    tmp: Path
    settings: Settings
    storage: Storage
    bucket: str
    manifest_uri: str
    labels: Path
    at: dt.datetime

    @property
    def location(self) -> Location:
        return Location(artifact_root=self.settings.artifact_root, source_uri=self.bucket, data_dir=str(self.tmp))

    def label(self, inference_id: str, count: object) -> None:
        path = self.labels / "metadata" / f"{inference_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"EXPECTED_QUANTITY": count}))

    def capture(self, *requests: tuple[bytes, str | None, dict[int, float]], model_version: str = "shop:1") -> None:
        """Send ``(photo, InferenceId, count distribution)`` through the real capture writer, one second apart."""
        writer = CaptureWriter(
            capture_prefix(self.settings.artifact_root, ENDPOINT), CaptureConfig(sampling_percentage=100), self.storage
        )
        for photo, inference_id, probabilities in requests:
            self.at += dt.timedelta(seconds=1)
            answer = {
                "predictions": [
                    {
                        "predicted_count": max(probabilities, key=probabilities.__getitem__),
                        "probabilities": {str(c): p for c, p in probabilities.items()},
                    }
                ]
            }
            writer.offer(
                Exchange(
                    photo, "image/jpeg", json.dumps(answer).encode(), "application/json", 200, 5.0, self.at,
                    inference_id, model_version,
                )
            )  # fmt: skip
        assert writer.close().stored == len(requests)

    def plan(self, budget: int = 0) -> Harvest:
        return Harvest(
            ENDPOINT,
            DATASET,
            self.settings.artifact_root,
            capture_prefix(self.settings.artifact_root, ENDPOINT),
            self.labels.as_uri(),
            budget=budget,
        )


def photo(seed: int, count: int = 3, darker: float = 1.0) -> bytes:
    image = render_bin_image(count, np.random.default_rng(seed), size=32)
    return jpeg_bytes(Image.eval(image, lambda v: int(v * darker)))


SURE = {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 0.0}


@pytest.fixture
def world(tmp_path: Path) -> World:
    storage = Storage()
    bucket = (tmp_path / "bucket").as_uri()
    manifest_uri = generate_demo_bucket(storage, bucket, images=40, seed=0, size=32)
    settings = Settings.load(artifact_root=str(tmp_path / "artifacts"), source_uri=bucket, data_dir=str(tmp_path))
    manifest = read_manifest(storage, manifest_uri)
    _, downloaded = download_images(manifest, bucket, tmp_path / "raw", storage)
    record_split(storage, settings.artifact_uri("datasets", DATASET), manifest, downloaded, bucket, FRACTIONS)
    return World(
        tmp_path, settings, storage, bucket, manifest_uri, tmp_path / "labels", dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    )


def artifact_markdown(flow_run_id, key: str = f"harvest-feedback-{DATASET}") -> str:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    return str(found[0].data) if found else ""


def test_harvest_adds_the_labelled_new_photos_once_and_records_their_lineage(prefect_server, world: World) -> None:
    new = [photo(100 + n, darker=0.5) for n in range(3)]
    already = (world.tmp / "bucket" / "bin-images" / "00002.jpg").read_bytes()  # in the dataset's split
    for number in range(3):
        world.label(f"L{number}", 2 + number)
    world.label("00002", 3)
    world.capture(
        (new[0], "L0", SURE), (new[1], "L1", SURE), (new[2], "L2", SURE), (already, "00002", SURE),
        (photo(200), "nolabel", SURE), (new[0], "L0", SURE),
    )  # fmt: skip

    state = harvest_feedback(
        ENDPOINT,
        DATASET,
        world.labels.as_uri(),
        world.manifest_uri,
        budget=0,
        location=world.location,
        return_state=True,
    )
    version = state.result()

    digests = [hashlib.sha256(p).hexdigest() for p in new]
    assert [a.image_id for a in version.added] == [photo_id(d) for d in digests]
    assert [a.label for a in version.added] == [2, 3, 4]
    base = read_manifest(world.storage, world.manifest_uri)
    manifest = read_manifest(world.storage, version.manifest_uri)
    assert manifest == {**base, **{photo_id(d): label for d, label in zip(digests, [2, 3, 4], strict=True)}}
    assert version.version == 1 and version.mirrored == len(base) and not version.not_in_base
    lineage = version.added[1].lineage
    assert (lineage.endpoint, lineage.model_version, lineage.inference_id, lineage.labelled_by) == (
        ENDPOINT, "shop:1", "L1", "labels",
    )  # fmt: skip
    assert lineage.captured_at == "2026-12-01T00:00:02.000Z"
    assert lineage.capture_file.startswith(capture_prefix(world.settings.artifact_root, ENDPOINT) + "/2026/12/01/00/")
    source = feedback_uri(world.settings.artifact_root, DATASET)
    assert version.source_uri == source
    assert world.storage.read_bytes(f"{source}/bin-images/{version.added[0].image_id}.jpg") == new[0]
    metadata = json.loads(world.storage.read_bytes(f"{source}/metadata/{version.added[2].image_id}.json"))
    assert metadata["EXPECTED_QUANTITY"] == 4
    markdown = artifact_markdown(state.state_details.flow_run_id)
    assert all(a.image_id in markdown for a in version.added)
    summary = wait_until(
        lambda: artifact_markdown(state.state_details.flow_run_id, "summary-harvest-feedback"), what="the summary"
    )
    assert version.manifest_uri in summary

    again = harvest_feedback(ENDPOINT, DATASET, world.labels.as_uri(), world.manifest_uri, location=world.location)
    assert again is None, "the cursor passed them and their sha256 is in the dataset"
    assert latest_version(world.storage, world.settings.artifact_root, DATASET).version == 1


def test_an_unsafe_inference_id_and_an_out_of_range_label_are_refused_named_and_listed(
    prefect_server, world: World
) -> None:
    world.label("seven", 7)
    world.label("fine", 2)
    world.capture((photo(1), "../../x", SURE), (photo(2), "seven", SURE), (photo(3), "fine", SURE))

    state = harvest_feedback(
        ENDPOINT, DATASET, world.labels.as_uri(), world.manifest_uri, location=world.location, return_state=True
    )

    version = state.result()
    assert [a.lineage.inference_id for a in version.added] == ["fine"]
    markdown = artifact_markdown(state.state_details.flow_run_id)
    assert "'../../x' is not an image id" in markdown
    assert "label 7 of photo seven is outside the classes [1, 2, 3, 4, 5]" in markdown
    root = Path(world.tmp / "artifacts")
    written = {p for p in world.tmp.parent.rglob("*") if p.is_file()} - set(world.tmp.rglob("*"))
    assert not [p for p in written if p.name.startswith("x")], "nothing outside the test's folder"
    assert not (root.parent.parent / "x.jpg").exists() and not list(root.rglob("x.*"))


def test_the_queue_takes_the_most_uncertain_photos_up_to_the_budget_one_per_near_duplicate(world: World) -> None:
    unsure = photo(10)
    recompressed = jpeg_bytes(Image.open(io.BytesIO(unsure)), quality=70)  # another sha256, the same picture
    world.capture(
        (unsure, None, {1: 0.0, 2: 0.3, 3: 0.4, 4: 0.3, 5: 0.0}),
        (recompressed, None, {1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2}),
        (photo(11), None, {1: 0.0, 2: 0.1, 3: 0.8, 4: 0.1, 5: 0.0}),
        (photo(12), None, SURE),
        (photo(13), None, {1: 0.0, 2: 0.5, 3: 0.5, 4: 0.0, 5: 0.0}),
    )

    result = harvest(world.storage, world.storage, world.plan(budget=2))

    digest = hashlib.sha256
    assert [item.image_id for item in result.queued] == [
        photo_id(digest(recompressed).hexdigest()),  # the widest spread
        photo_id(digest(photo(13)).hexdigest()),  # the near-duplicate `unsure` is skipped
    ]
    assert not result.added and result.unlabelled == 5
    assert [i.image_id for i in open_queue(world.storage, world.settings.artifact_root, DATASET)] == [
        i.image_id for i in result.queued
    ]
    again = harvest(world.storage, world.storage, world.plan(budget=2))
    assert again.duplicates == 2 and not [i for i in again.queued if i.image_id in {q.image_id for q in result.queued}]


def test_a_photo_two_model_versions_count_differently_comes_before_an_uncertain_one(world: World) -> None:
    shown = photo(20)
    world.capture((photo(21), None, {1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2}), (shown, "d1", SURE))
    world.capture((shown, "d1", {1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0, 5: 0.0}), model_version="shop:2")  # a shadow

    (queued,) = harvest(world.storage, world.storage, world.plan(budget=1)).queued

    assert queued.image_id == photo_id(hashlib.sha256(shown).hexdigest()) and queued.disagreement


def test_label_studio_export_and_import_add_the_answers(prefect_server, world: World) -> None:
    photos = [photo(30 + n) for n in range(3)]
    world.capture(*[(p, None, {1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2}) for p in photos])
    harvest(world.storage, world.storage, world.plan(budget=3))
    tasks_path = world.tmp / "tasks.json"

    assert export_label_queue(DATASET, str(tasks_path), location=world.location) == 3
    assert '<Image name="image" value="$image"/>' in label_studio_config() and '<Choice value="5"/>' in (
        label_studio_config()
    )
    tasks = json.loads(tasks_path.read_text())
    assert all(task["data"]["image"].startswith("data:image/jpeg;base64,") for task in tasks)
    answers = [
        {"type": "choices", "value": {"choices": ["4"]}},
        {"type": "number", "value": {"number": 2}},
        {"type": "choices", "value": {"choices": ["9"]}},
    ]
    export = [  # Label Studio's JSON export: its own ids, the data as imported, the annotations
        {
            "id": 500 + n,
            "data": task["data"],
            "annotations": [
                {"id": 1, "result": [{"id": "a", "from_name": "count", "to_name": "image", **answer}],
                 "was_cancelled": False, "ground_truth": False, "completed_by": 1, "task": 500 + n},
            ],
            "predictions": [],
        }
        for n, (task, answer) in enumerate(zip(tasks, answers, strict=True))
    ]  # fmt: skip
    export_path = world.tmp / "export.json"
    export_path.write_text(json.dumps(export))

    state = import_label_answers(
        ENDPOINT, str(export_path), DATASET, world.manifest_uri, location=world.location, return_state=True
    )

    version = state.result()
    items = [task["data"]["item"] for task in tasks]
    assert [(a.image_id, a.label, a.lineage.labelled_by) for a in version.added] == [
        (items[0], 4, "label-studio"), (items[1], 2, "label-studio"),
    ]  # fmt: skip
    assert read_manifest(world.storage, version.manifest_uri)[items[1]] == 2
    assert [i.image_id for i in open_queue(world.storage, world.settings.artifact_root, DATASET)] == [items[2]]
    assert f"count 9 for photo {items[2]} is outside the classes" in artifact_markdown(state.state_details.flow_run_id)


def test_the_stable_split_places_the_new_images_without_moving_an_old_one(world: World) -> None:
    dataset_uri = world.settings.artifact_uri("datasets", DATASET)
    before = read_placements(world.storage, dataset_uri).table.set_index("id")["split"].to_dict()
    for number in range(8):
        world.label(f"n{number}", 1 + number % 5)
    world.capture(*[(photo(60 + n, 1 + n % 5, darker=0.6), f"n{n}", SURE) for n in range(8)])
    result = harvest(world.storage, world.storage, world.plan())
    base = feedback_base({}, world.bucket, DATASET, world.manifest_uri)
    version = record_version(world.storage, world.storage, world.settings.artifact_root, base, result.added)

    manifest = read_manifest(world.storage, version.manifest_uri)  # downloaded from the feedback source alone
    report, downloaded = download_images(manifest, version.source_uri, world.tmp / "raw-feedback", world.storage)
    assert report.requested == len(manifest) and not report.missing
    view = record_split(world.storage, dataset_uri, manifest, downloaded, version.source_uri, FRACTIONS)

    sides = view.table.set_index("id")["split"].astype(str).to_dict()
    assert {image_id: sides[image_id] for image_id in before} == before
    assert view.placed == 8 and set(sides) - set(before) == {a.image_id for a in version.added}
    assert set(view.table[view.table["id"].str.startswith("fb-")]["split"].astype(str)) <= {"train", "valid", "test"}


def test_the_prefect_ui_form_asks_a_count_per_photo_and_adds_the_answers(prefect_server, world: World) -> None:
    world.capture(*[(photo(80 + n), None, {1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2}) for n in range(2)])
    harvest(world.storage, world.storage, world.plan(budget=2))
    queued = open_queue(world.storage, world.settings.artifact_root, DATASET)  # the form's order
    outcome: dict[str, object] = {}
    runner = threading.Thread(
        target=lambda: outcome.update(
            state=label_feedback(ENDPOINT, DATASET, base_manifest_uri=world.manifest_uri, location=world.location,
                                 return_state=True)
        )
    )  # fmt: skip
    runner.start()

    def paused_run():
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
        return next((run for run in runs if run.state and run.state.is_paused()), None)

    run = wait_until(paused_run, timeout_s=60, what="the label-feedback run to pause for its form")
    keyset = run.state.state_details.run_input_keyset
    description = read_flow_run_input(keyset["description"], run.id)
    assert description.count("](data:image/jpeg;base64,") == 2, "each photo inline"
    schema = read_flow_run_input(keyset["schema"], run.id)
    field = {k: schema["properties"]["photo_1"][k] for k in ("type", "minimum", "maximum", "default")}
    assert field == {"type": "integer", "minimum": 0, "maximum": 5, "default": 0}, "a number box; 0 skips"
    resume_flow_run(run.id, run_input={"photo_1": 5, "photo_2": 0})
    wait_until(lambda: "state" in outcome, timeout_s=60, what="the resumed run to finish")
    runner.join()

    version = outcome["state"].result()
    assert [(a.image_id, a.label, a.lineage.labelled_by) for a in version.added] == [
        (queued[0].image_id, 5, "prefect-ui")
    ]


def test_drift_starts_a_harvest_whose_event_starts_the_nightly(server_env: dict[str, str]) -> None:
    """On a Prefect server of its own: the chain's automations turn a drift event into a harvest run that asks for
    a retrain, and only a harvest that asked for one (its event says so) into a nightly run for the endpoint."""
    root = Path(__file__).resolve().parents[1]
    setup = (
        "from flows.harvest import harvest_feedback\n"
        "from flows.nightly import nightly_retrain\n"
        "harvest_feedback.to_deployment(name='daily').apply()\n"
        "nightly_retrain.to_deployment(name='nightly').apply()\n"
        "from deployments.automations import feedback_chain_automations\n"
        "for automation in feedback_chain_automations():\n"
        "    automation.create()\n"
    )
    subprocess.run([sys.executable, "-c", setup], env=server_env, cwd=root, check=True, timeout=120)
    api = server_env["PREFECT_API_URL"]

    def automation_runs(deployment: str) -> list[dict]:
        found = httpx.get(f"{api}/deployments/name/{deployment}", timeout=10).json()
        query = {"deployments": {"id": {"any_": [found["id"]]}}}
        runs = httpx.post(f"{api}/flow_runs/filter", json=query, timeout=10).json()
        return [r for r in runs if (r.get("created_by") or {}).get("type") == "AUTOMATION"]

    emit = (
        "from prefect.events import emit_event\n"
        "def harvested(endpoint, retrain):\n"
        "    return {'prefect.resource.id': 'bincount.dataset.abid', 'prefect.resource.name': 'abid', "
        "'bincount.endpoint': endpoint, 'bincount.retrain': retrain}\n"
        "emit_event(event='bincount.monitor.drift-detected', "
        "resource={'prefect.resource.id': 'bincount.endpoint.shop', 'prefect.resource.name': 'shop'})\n"
        "scheduled = emit_event(event='bincount.feedback.harvested', resource=harvested('scheduled', 'false'))\n"
        "emit_event(event='bincount.feedback.harvested', resource=harvested('shop', 'true'), follows=scheduled)\n"
    )
    subprocess.run([sys.executable, "-c", emit], env=server_env, cwd=root, check=True, timeout=120)

    harvests = wait_until(
        lambda: automation_runs("harvest-feedback/daily"), timeout_s=60, interval_s=1, what="a harvest run on drift"
    )
    assert [(r["parameters"]["endpoint_name"], r["parameters"]["then_retrain"]) for r in harvests] == [("shop", True)]
    nightlies = wait_until(
        lambda: automation_runs("nightly-retrain/nightly"), timeout_s=60, interval_s=1, what="a nightly run"
    )
    # the scheduled harvest's event came first (``follows``): had it started a nightly, that one would be listed
    assert [r["parameters"]["endpoint_name"] for r in nightlies] == ["shop"], "only the harvest that asked for it"
