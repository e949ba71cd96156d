"""The monitor flow on captured traffic: unshifted traffic is ok, darker photos with another count mix drift;
live accuracy from the captured ids' metadata; no traffic and a missing baseline are said plainly; a model
that fails on some photos makes the monitor emit error-rate-high, the callers' 415s do not; bad capture lines
are skipped, listed and passed; a first run reads the last 24 h; reading streams; PSI and chi-square."""

from __future__ import annotations

import datetime as dt
import json
import os
import tracemalloc
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from botocore.exceptions import ClientError
from PIL import ImageEnhance
from prefect import get_client
from prefect.events import Event
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from test_serve_rollout import PHOTOS, overflowing_model_dir
from waiting import wait_until

from bincount import monitoring
from bincount.capture import CaptureReader, CaptureWriter, Exchange, capture_prefix, capture_record, parse_record
from bincount.config import Location, Settings
from bincount.contracts.registry import DatasetRef, ModelMetrics, ModelVersionSpec
from bincount.contracts.serving import CaptureConfig, EndpointRecord
from bincount.demo_data import generate_demo_bucket, jpeg_bytes, render_bin_image
from bincount.endpoints import EndpointRecords, smoke_image
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend, runtime_client
from bincount.models import write_untrained_model_dir
from bincount.monitoring import (
    Baseline,
    DriftThresholds,
    TrafficWindow,
    last_report,
    monitor_window,
    read_cursor,
    store_baseline,
)
from bincount.registry import StorageModelRegistry, now_iso
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

    def captured() -> bool:
        status = backend._router_status(url, name)
        return status is not None and status.capture is not None and status.capture.captured >= count

    wait_until(captured, what=f"{count} requests to {name} to be captured")


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


def events_about(name: str, resource_id: str) -> list[Event]:
    with get_client(sync_client=True) as client:
        return client.read_events(
            EventFilter(event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id])), limit=50
        ).events


def test_a_model_failing_on_some_photos_makes_the_monitor_emit_error_rate_high_and_as_many_415s_do_not(
    prefect_server: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two endpoints, the same share of failed requests: on one the model fails (non-finite scores: a 500 inside
    the runtime's ModelError), on the other the callers send a content type it does not take (415)."""
    root = tmp_path_factory.mktemp("errors")
    settings = Settings.load(artifact_root=str(root / "artifacts"))
    base = write_untrained_model_dir(root / "base", "resnet18", 32, seed=5)
    overflowing, fails_on = overflowing_model_dir(base, root / "overflows", smoke_image(32))
    failures = sum(photo in fails_on for photo in PHOTOS)
    suffix = uuid.uuid4().hex[:6]
    failing, picky = f"failing-{suffix}", f"picky-{suffix}"
    backend = LocalServingBackend(settings, host_options=HostOptions(threads=1))
    capture = CaptureConfig(sampling_percentage=100)
    try:
        with ThreadPoolExecutor(2) as pool:  # two endpoints start at once
            started = {
                name: pool.submit(backend.deploy, name, model.as_uri(), capture=capture)
                for name, model in ((failing, overflowing), (picky, base))
            }
            records = {name: future.result() for name, future in started.items()}
        errors: dict[str, list[int]] = {failing: [], picky: []}
        for name, record in records.items():
            client = runtime_client(record.url, max_attempts=1)
            for photo in PHOTOS:
                refused = name == picky and photo in fails_on
                try:
                    client.invoke_endpoint(
                        EndpointName=name, Body=photo, ContentType="text/plain" if refused else "image/jpeg"
                    )
                except ClientError as error:
                    errors[name].append(error.response["OriginalStatusCode"])
            wait_for_capture(backend, record.url, name, len(PHOTOS))
        assert errors == {failing: [500] * failures, picky: [415] * failures} and 0 < failures < len(PHOTOS)

        by_name = {r.endpoint: r for r in monitor_endpoint([picky, failing], location=Location.of(settings))}
    finally:
        for name in backend.records.names():
            backend.delete(name)
    bad, fine = by_name[failing], by_name[picky]
    assert bad.requests == len(PHOTOS) and bad.errors == failures and bad.client_errors == 0
    assert bad.error_rate == pytest.approx(failures / len(PHOTOS)) and bad.error_rate_high
    assert fine.requests == len(PHOTOS) and fine.errors == 0 and fine.client_errors == failures
    assert fine.error_rate == 0.0 and not fine.error_rate_high

    (event,) = wait_until(
        lambda: events_about("bincount.monitor.error-rate-high", f"bincount.endpoint.{failing}"),
        what="the monitor's error-rate-high event on the server",
    )
    assert event.payload["errors"] == failures and event.payload["client_errors"] == 0
    wait_until(  # the verdict's event is sent after any error-rate-high of the same endpoint
        lambda: events_about("bincount.monitor.inconclusive", f"bincount.endpoint.{picky}"),
        what="the monitor's verdict event for the endpoint that answered 415s",
    )
    assert events_about("bincount.monitor.error-rate-high", f"bincount.endpoint.{picky}") == []


def recorded_endpoint(settings: Settings, name: str) -> None:
    """An endpoint record with no registered version (its host is not needed to read its capture)."""
    record = EndpointRecord(
        name, "http://127.0.0.1:9", "file:///m", "0" * 12, "resnet18", 32, [1, 2, 3, 4, 5], "local", now_iso()
    )
    EndpointRecords(settings, Storage()).write(record)


def exchange(at: dt.datetime, inference_id: str, body: bytes = b"", count: int = 2) -> Exchange:
    answer = json.dumps({"predictions": [{"predicted_count": count}]}).encode()
    return Exchange(body, "image/jpeg", answer, "application/json", 200, 3.0, at, inference_id, "g:1")


def capture(settings: Settings, name: str, exchanges: list[Exchange], max_inline_bytes: int = 512 * 1024) -> Path:
    """Written by the real writer; the capture file's path."""
    writer = CaptureWriter(
        capture_prefix(settings.artifact_root, name),
        CaptureConfig(sampling_percentage=100, max_inline_bytes=max_inline_bytes, max_file_bytes=1),
        Storage(),
    )
    for item in exchanges:
        writer.offer(item)
    assert writer.close().captured == len(exchanges)
    return max(Path(settings.artifact_root.removeprefix("file://")).rglob("*.jsonl"), key=os.path.getmtime)


def test_bad_capture_lines_are_skipped_listed_and_passed_by_the_cursor(prefect_server: None, tmp_path: Path) -> None:
    settings = Settings.load(artifact_root=str(tmp_path / "artifacts"))
    name = "garbled"
    recorded_endpoint(settings, name)
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    path = capture(settings, name, [exchange(start + dt.timedelta(seconds=s), f"good{s}") for s in range(3)])
    no_data = json.loads(path.read_text())
    del no_data["captureData"]
    no_data["eventMetadata"]["inferenceTime"] = (start + dt.timedelta(seconds=5)).isoformat()
    with path.open("a") as file:
        file.write(json.dumps(no_data) + "\n" + '{"captureData": {"endpointInput": {"da\n')

    (report,) = monitor_endpoint([name], location=Location.of(settings))
    assert report.requests == 3 and report.skipped == 2, report
    problems = "\n".join(report.problems)
    assert "line 2: not a capture record (no captureData)" in problems and "line 3: not JSON" in problems
    assert read_cursor(Storage(), settings.artifact_root, name) == start + dt.timedelta(seconds=5)

    capture(settings, name, [exchange(start + dt.timedelta(seconds=10 + s), f"later{s}") for s in range(2)])
    (later,) = monitor_endpoint([name], location=Location.of(settings))
    assert later.requests == 2 and "no captureData" not in "\n".join(later.problems), later


def test_a_first_run_reads_the_last_24_hours_at_most(prefect_server: None, tmp_path: Path) -> None:
    settings = Settings.load(artifact_root=str(tmp_path / "artifacts"))
    name = "history"
    recorded_endpoint(settings, name)
    now = dt.datetime.now(dt.UTC)
    old = [exchange(now - dt.timedelta(days=3, seconds=s), f"old{s}") for s in range(4)]
    recent = [exchange(now - dt.timedelta(hours=1, seconds=s), f"new{s}") for s in range(2)]
    capture(settings, name, old + recent)
    (report,) = monitor_endpoint([name], location=Location.of(settings))
    assert report.requests == 2 and report.verdict == "no-baseline", report
    (wider,) = monitor_endpoint(["history"], location=Location.of(settings))
    assert wider.requests == 0, "the cursor is past the window now"


def test_reading_a_window_streams_it_in_bounded_memory(tmp_path: Path) -> None:
    """40 files of one 1 MB request each: the window's figures are built holding about one file at a time."""
    settings = Settings.load(artifact_root=str(tmp_path / "artifacts"))
    start = dt.datetime(2026, 11, 30, 10, 0, 0, tzinfo=dt.UTC)
    rng = np.random.default_rng(0)
    bodies = [exchange(start + dt.timedelta(seconds=s), f"i{s}", rng.bytes(1 << 20)) for s in range(40)]
    capture(settings, "big", bodies, max_inline_bytes=2 << 20)
    del bodies
    tracemalloc.start()
    try:
        window = TrafficWindow.read(CaptureReader(Storage(), capture_prefix(settings.artifact_root, "big")))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert window.requests == 40 and window.predicted[2] == 40
    assert peak < 12 * (1 << 20), f"peak {peak / (1 << 20):.0f} MiB while reading ~54 MiB of capture"


def counted(counts: dict[int, int]) -> TrafficWindow:
    """A window of records (as the reader parses them) answering ``counts``: predicted count -> requests."""
    window = TrafficWindow()
    at = dt.datetime(2026, 11, 30, 10, 0, 0, tzinfo=dt.UTC)
    for count, requests in counts.items():
        for n in range(requests):
            line = json.loads(json.dumps(capture_record(exchange(at, f"{count}-{n}", count=count), 1024)))
            window.add(parse_record(line))
    window.start = window.end = at
    return window


def test_a_long_window_keeps_a_bounded_uniform_sample_of_latencies_and_input_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past MAX_KEPT requests (here 50), latencies and statistics are a sample of the whole window, not its start."""
    monkeypatch.setattr(monitoring, "MAX_KEPT", 50)
    photo = jpeg_bytes(render_bin_image(2, np.random.default_rng(0), size=48))
    window = TrafficWindow()
    start = dt.datetime(2026, 11, 30, 10, 0, 0, tzinfo=dt.UTC)
    for n in range(1000):
        record = capture_record(exchange(start + dt.timedelta(seconds=n), f"r{n}", photo), 1 << 20)
        record["eventMetadata"]["bincount"]["latencyMs"] = float(n)  # each request's latency names it
        window.add(parse_record(json.loads(json.dumps(record))))
    assert (window.requests, window.timed, window.measured) == (1000, 1000, 1000)
    assert len(window.latencies) == 50 and all(len(values) == 50 for values in window.features.values())
    assert len(set(window.latencies)) == 50 and set(window.latencies) <= {float(n) for n in range(1000)}
    assert sum(latency >= 500 for latency in window.latencies) >= 10, "the later half of the window is sampled"


def test_psi_and_chi_square_detect_a_drifted_count_distribution_and_not_an_undrifted_one() -> None:
    baseline = Baseline(
        "file:///m", "file:///s", {}, {"1": 0.2, "2": 0.2, "3": 0.2, "4": 0.2, "5": 0.2}, {}, images=300
    )
    thresholds = DriftThresholds()
    same = monitor_window("e", counted({1: 42, 2: 38, 3: 40, 4: 41, 5: 39}), baseline, thresholds)
    assert same.psi is not None and same.chi2_p is not None
    assert same.psi < 0.02 and same.chi2_p > 0.5 and same.verdict == "ok" and same.drifted == []
    drifted = monitor_window("e", counted({1: 10, 2: 10, 3: 20, 4: 60, 5: 100}), baseline, thresholds)
    assert drifted.psi is not None and drifted.chi2_p is not None
    assert drifted.psi > thresholds.psi and drifted.chi2_p < thresholds.chi2_alpha
    assert drifted.verdict == "drift" and "predicted counts" in drifted.message
    strict = DriftThresholds(psi=5.0)  # both must agree: chi-square alone does not call drift
    assert monitor_window("e", counted({1: 10, 2: 10, 3: 20, 4: 60, 5: 100}), baseline, strict).verdict == "ok"
