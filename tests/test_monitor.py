"""The monitor flow on captured traffic: unshifted traffic is ok, darker photos with another count mix drift;
live accuracy from the captured ids' metadata; no traffic and a missing baseline are said plainly."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import ImageEnhance

from bincount.config import Location, Settings
from bincount.contracts.registry import DatasetRef, ModelMetrics, ModelVersionSpec
from bincount.contracts.serving import CaptureConfig
from bincount.demo_data import generate_demo_bucket, jpeg_bytes, render_bin_image
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend, runtime_client
from bincount.models import write_untrained_model_dir
from bincount.monitoring import last_report, store_baseline
from bincount.registry import StorageModelRegistry
from bincount.storage import Storage
from flows.monitor import monitor_endpoint

NAME = "watched"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A demo bucket (with metadata), a training side made of its first 80 photos, a registered model with its
    baseline, and an endpoint serving it with capture at 100%."""
    root = tmp_path_factory.mktemp("monitor")
    settings = Settings.load(artifact_root=str(root / "artifacts"), source_uri=str(root / "bucket"))
    storage = Storage()
    generate_demo_bucket(storage, settings.source_uri, images=160, seed=3, size=64)
    manifest = json.loads((root / "bucket" / "file_list.json").read_text())
    labels = {Path(key).stem: int(count) for count, keys in manifest.items() for key in keys}
    ids = sorted(labels)
    dataset = root / "artifacts" / "datasets" / "demo"
    rows = []
    for image_id in ids[:80]:
        target = dataset / "channels" / "train" / str(labels[image_id]) / f"{image_id}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((root / "bucket" / "bin-images" / f"{image_id}.jpg").read_bytes())
        rows.append({"id": image_id, "label": labels[image_id], "split": "train"})
    split_uri = (dataset / "split.csv").as_uri()
    pd.DataFrame(rows).to_csv(dataset / "split.csv", index=False)
    model_uri = write_untrained_model_dir(root / "model", "resnet18", 32, seed=4).as_uri()
    baseline_uri = store_baseline(
        storage, settings.artifact_uri("registry", NAME, "baselines", "m.json"), split_uri, model_uri
    )
    spec = ModelVersionSpec(
        model_uri=model_uri,
        model_sha256="0" * 64,
        metrics=ModelMetrics(accuracy=0.3, rmse=1.5, within_one_accuracy=0.7, per_class_accuracy={}, images=10),
        dataset=DatasetRef(split_uri, "ab" * 32, {"train": 80}),
        code_hash="cd" * 32,
        hyperparameters={},
        training_job="job-1",
        baseline_uri=baseline_uri,
    )
    version = StorageModelRegistry(storage, settings.artifact_root).register(NAME, spec)
    backend = LocalServingBackend(settings, host_options=HostOptions(threads=1))
    record = backend.deploy(NAME, model_uri, str(version.ref), capture=CaptureConfig(sampling_percentage=100))
    yield {"settings": settings, "ids": ids, "root": root, "record": record, "backend": backend, "model_uri": model_uri}
    for name in backend.records.names():
        backend.delete(name)


def send(url: str, bodies: list[tuple[bytes, str | None]], name: str = NAME) -> None:
    client = runtime_client(url, max_attempts=1)
    for body, inference_id in bodies:
        extra = {"InferenceId": inference_id} if inference_id else {}
        client.invoke_endpoint(EndpointName=name, Body=body, ContentType="image/jpeg", **extra)


def wait_for_capture(backend: LocalServingBackend, url: str, name: str, count: int) -> None:
    """The writer is asynchronous: wait until it has written what was sent."""
    deadline = time.monotonic() + 30
    while (backend._router_status(url, name) or {}).get("capture", {}).get("captured", 0) < count:
        assert time.monotonic() < deadline, backend._router_status(url, name)
        time.sleep(0.1)


def test_unshifted_traffic_is_ok_then_darker_photos_of_another_mix_drift(prefect_server: None, world: dict) -> None:
    settings, root, record = world["settings"], world["root"], world["record"]
    location = Location.of(settings)
    unseen = world["ids"][80:]
    send(record.url, [((root / "bucket" / "bin-images" / f"{i}.jpg").read_bytes(), i) for i in unseen])
    wait_for_capture(world["backend"], record.url, NAME, len(unseen))

    (report,) = monitor_endpoint([NAME], location=location)
    assert report.verdict == "ok", report.message
    assert report.requests == len(unseen) and report.errors == 0 and set(report.latency_ms) == {"p50", "p90", "p99"}
    assert report.labelled == len(unseen) and report.accuracy is not None and report.rmse is not None
    assert report.model_version == f"{NAME}:1"

    rng = np.random.default_rng(9)
    darker = [
        (jpeg_bytes(ImageEnhance.Brightness(render_bin_image(5 if n % 4 else 1, rng, size=64)).enhance(0.35)), None)
        for n in range(60)
    ]
    send(record.url, darker)
    wait_for_capture(world["backend"], record.url, NAME, len(unseen) + len(darker))
    (shifted,) = monitor_endpoint([NAME], location=location)
    assert shifted.requests == len(darker), "only the traffic since the last run"
    assert shifted.verdict == "drift", shifted.message
    assert "brightness" in shifted.message
    assert shifted.labelled == 0 and shifted.accuracy is None
    assert last_report(Storage(), settings.artifact_root, NAME)["verdict"] == "drift"

    (quiet,) = monitor_endpoint([NAME], location=location)
    assert quiet.verdict == "no-traffic" and "no captured requests" in quiet.message


def test_a_model_without_a_baseline_and_a_broken_endpoint_do_not_hide_the_others(
    prefect_server: None, world: dict
) -> None:
    settings, backend = world["settings"], world["backend"]
    older = backend.deploy(
        "older", world["model_uri"], capture=CaptureConfig(sampling_percentage=100)
    )  # no registered version
    send(
        older.url,
        [(jpeg_bytes(render_bin_image(2, np.random.default_rng(n), size=64)), None) for n in range(5)],
        "older",
    )
    wait_for_capture(backend, older.url, "older", 5)
    state = monitor_endpoint.with_options(name="monitor-endpoint")(
        [NAME, "older", f"missing-{uuid.uuid4().hex[:6]}"], location=Location.of(settings), return_state=True
    )
    assert state.is_failed() and "1 of 3 endpoints could not be monitored" in state.message
    found = last_report(Storage(), settings.artifact_root, "older")
    assert found["verdict"] == "no-baseline" and found["requests"] == 5 and "traffic figures only" in found["message"]
