"""Data capture: a local endpoint under concurrent load at 100%, a writer that hangs, rolling, uploads that fail
for a while (and past close) on the loopback S3 API, and bad capture files."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image
from waiting import wait_until

from bincount.capture import (
    CaptureReader,
    CaptureWriter,
    Exchange,
    capture_prefix,
    read_capture,
    staging_root,
)
from bincount.config import Settings
from bincount.contracts.router import RouterStatus
from bincount.contracts.serving import CaptureConfig, EndpointRecord
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend, runtime_client
from bincount.loopback_s3 import LoopbackS3
from bincount.models import write_untrained_model_dir
from bincount.monitoring import DriftThresholds, TrafficWindow, monitor_window
from bincount.storage import Storage

NAME = "captured"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings.load(artifact_root=str(tmp_path_factory.mktemp("artifacts")))


@pytest.fixture(scope="module")
def endpoint(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalServingBackend, EndpointRecord]]:
    model = write_untrained_model_dir(tmp_path_factory.mktemp("model") / "m", "resnet18", 32, seed=1)
    backend = LocalServingBackend(settings, host_options=HostOptions(max_batch_size=8, max_wait_ms=5, threads=1))
    record = backend.deploy(NAME, model.as_uri(), "captured:1", capture=CaptureConfig(sampling_percentage=100))
    yield backend, record
    if backend.records.read(NAME) is not None:
        backend.delete(NAME)


def photos(n: int, size: int = 48) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [jpeg_bytes(render_bin_image(1 + i % 5, rng, size=size)) for i in range(n)]


def test_every_answered_request_has_exactly_one_record_at_100_percent(
    settings: Settings, endpoint: tuple[LocalServingBackend, EndpointRecord]
) -> None:
    backend, record = endpoint
    assert record.capture and record.capture.sampling_percentage == 100
    client = runtime_client(record.url, max_attempts=1)
    images = photos(10)
    answered: dict[str, bytes] = {}
    lock = threading.Lock()

    def send(i: int) -> None:
        answer = client.invoke_endpoint(
            EndpointName=NAME, Body=images[i % len(images)], ContentType="image/jpeg", InferenceId=f"id-{i:04d}"
        )
        body = answer["Body"].read()
        with lock:
            answered[f"id-{i:04d}"] = body

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, range(160)))
    status = backend._router_status(record.url, NAME)
    assert status is not None and status.capture is not None and status.capture.dropped == 0, status
    backend.delete(NAME)  # SIGTERM: the router writes everything queued before it exits

    read = read_capture(Storage(), capture_prefix(settings.artifact_root, NAME))
    assert read.problems == []
    ids = [item.inference_id for item in read.records]
    assert sorted(ids) == sorted(answered), "exactly one record per answered request"
    for item in read.records:
        assert item.input_content_type == "image/jpeg" and item.image() in images
        assert item.inference_id is not None and json.loads(item.output_data) == json.loads(answered[item.inference_id])
        assert item.status == 200 and item.original_status is None and item.model_version == "captured:1"
    files = list(
        Path(settings.artifact_root.removeprefix("file://"), "data-capture", NAME, "AllTraffic").rglob("*.jsonl")
    )
    assert files and all(len(path.relative_to(files[0].parents[4]).parts) == 5 for path in files), files


@pytest.fixture
def hung_s3() -> Iterator[str]:
    """An address that accepts connections and never answers: an S3 that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def test_a_hung_writer_fails_no_request_and_drops_are_counted(
    tmp_path: Path, hung_s3: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The real router app, forwarding to its real host, capturing into an S3 that never answers."""
    model = write_untrained_model_dir(tmp_path_factory.mktemp("model2") / "m", "resnet18", 32, seed=2)
    backend = LocalServingBackend(Settings.load(artifact_root=str(tmp_path / "artifacts")))
    config = CaptureConfig(sampling_percentage=100, queue_size=4, max_file_bytes=1)  # every record rolls: an upload
    state = tmp_path / "router.json"
    state.write_text(
        json.dumps(
            {
                "variants": {"m": {"model_dir": str(model), "version": "m", "model_uri": model.as_uri()}},
                "current": "m",
                "host_args": HostOptions(threads=1).cli_args(),
                "capture": {
                    "config": config.to_dict(),
                    "destination": "s3://hung/data-capture/plain/AllTraffic",
                    "s3_endpoint_url": hung_s3,
                },
            }
        )
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    front = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bincount.local.router",
            "--name",
            "plain",
            "--state-file",
            str(state),
            "--fd",
            str(sock.fileno()),
            "--graceful-timeout",
            "5",
        ],
        pass_fds=[sock.fileno()],
        env={**os.environ, "TMPDIR": str(tmp_path)},  # its capture staging: killed below, it stays behind
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sock.close()
    hosts: list[int] = []
    try:
        client = runtime_client(url, max_attempts=1)
        image = photos(1)[0]

        def host_started() -> RouterStatus | None:
            assert front.poll() is None, "the router exited"
            status = backend._router_status(url, "plain")
            return status if status is not None and status.target is not None else None

        ready = wait_until(host_started, timeout_s=60, what="the router to start its host")
        hosts = [replica.pid for replica in ready.variants["m"].replicas]
        started = time.perf_counter()
        for _ in range(30):
            answer = client.invoke_endpoint(EndpointName="plain", Body=image, ContentType="image/jpeg")
            assert json.loads(answer["Body"].read())["predictions"][0]["predicted_count"] in (1, 2, 3, 4, 5)
        elapsed = time.perf_counter() - started
        status = backend._router_status(url, "plain")
    finally:
        front.kill()  # not SIGTERM: its writer would wait for the hung S3 on the way out
        front.wait()
        for pid in hosts:
            os.kill(pid, signal.SIGKILL)
    assert elapsed < 30, f"requests waited for the writer: {elapsed:.1f} s"
    capture = status.capture if status is not None else None
    assert capture is not None and capture.offered == 30 and capture.dropped >= 30 - 4 - 2, status


def exchange(at: dt.datetime, body: bytes = b"\xff\xd8abc", inference_id: str | None = None) -> Exchange:
    answer = b'{"predictions": [{"predicted_count": 2, "probabilities": {"1": 0, "2": 1, "3": 0, "4": 0, "5": 0}}]}'
    return Exchange(body, "image/jpeg", answer, "application/json", 200, 3.0, at, inference_id, "g:1")


def test_files_roll_by_hour_and_size_and_big_images_become_thumbnails(tmp_path: Path) -> None:
    prefix = (tmp_path / "capture").as_uri()
    big = jpeg_bytes(render_bin_image(3, np.random.default_rng(1), size=600), quality=95)
    writer = CaptureWriter(
        prefix, CaptureConfig(sampling_percentage=100, max_inline_bytes=20_000, max_file_bytes=3000), Storage()
    )
    base = dt.datetime(2026, 11, 30, 9, 59, 58, tzinfo=dt.UTC)
    writer.offer(exchange(base, big, "big"))
    for second in range(8):
        writer.offer(exchange(base + dt.timedelta(seconds=second), inference_id=f"s{second}"))
    writer.close()
    assert writer.stats.captured == 9 and writer.stats.dropped == 0
    hours = sorted(path.relative_to(tmp_path / "capture").parts[:4] for path in (tmp_path / "capture").rglob("*.jsonl"))
    assert {hour[3] for hour in hours} == {"09", "10"}
    assert len(hours) > 2, "the size bound rolled files too"
    read = read_capture(Storage(), prefix)
    assert len(read.records) == 9 and read.problems == []
    (thumb,) = [r for r in read.records if r.inference_id == "big"]
    assert thumb.input_kept == "thumbnail" and thumb.image() is not None
    image = Image.open(io.BytesIO(thumb.image() or b""))
    assert max(image.size) <= 256 and image.format == "JPEG"
    later = read_capture(Storage(), prefix, after=read.records[4].at)
    assert [r.inference_id for r in later.records] == [r.inference_id for r in read.records[5:]]


def test_capture_to_s3_stages_files_locally_and_leaves_no_staging_folder_behind(
    s3_server: LoopbackS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp makes the staging folder
    boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1").create_bucket(Bucket="staged")
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url, region="us-east-1")
    writer = CaptureWriter("s3://staged/capture", CaptureConfig(sampling_percentage=100), storage)
    at = dt.datetime(2026, 11, 30, 10, 0, 0, tzinfo=dt.UTC)
    for second in range(3):
        writer.offer(exchange(at + dt.timedelta(seconds=second), inference_id=f"s3-{second}"))
    writer.close()
    read = read_capture(storage, "s3://staged/capture")
    assert [r.inference_id for r in read.records] == ["s3-0", "s3-1", "s3-2"]
    assert writer.stats.stored == 3 and writer.stats.pending == 0
    assert list(tmp_path.iterdir()) == []


def test_uploads_that_fail_while_the_bucket_is_missing_are_retried_and_lose_nothing(
    s3_server: LoopbackS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination bucket is missing for a while: the rolled file stays staged, its upload is retried with
    backoff while records keep coming, and once the bucket is there every record arrives."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bucket = f"late-{uuid.uuid4().hex[:8]}"
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url, region="us-east-1", max_attempts=1)
    writer = CaptureWriter(
        f"s3://{bucket}/capture", CaptureConfig(sampling_percentage=100), storage, retry_initial_s=0.05, retry_max_s=0.2
    )
    at = dt.datetime(2026, 11, 30, 9, 59, 58, tzinfo=dt.UTC)
    for second in range(5):  # the hour turns after two records: the first file rolls and its upload fails
        writer.offer(exchange(at + dt.timedelta(seconds=second), inference_id=f"r{second}"))
    wait_until(lambda: writer.stats.upload_failures >= 3, what="the upload to be tried again")
    assert writer.stats.captured == 5 and writer.stats.stored == 0 and writer.stats.pending == 5
    assert writer.stats.pending_files == 1 and writer.stats.failed == 0  # the rolled file; the second is open
    boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    wait_until(lambda: writer.stats.stored == 2, what="the staged file to be uploaded once the bucket is back")
    writer.close()
    assert writer.stats.stored == 5 and writer.stats.pending == 0 and writer.stats.pending_files == 0
    read = read_capture(storage, f"s3://{bucket}/capture")
    assert [r.inference_id for r in read.records] == [f"r{second}" for second in range(5)] and read.problems == []
    assert list(tmp_path.iterdir()) == [], "nothing left staged"


def test_what_could_not_be_uploaded_by_close_is_reported_and_the_next_writer_uploads_it(
    s3_server: LoopbackS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bucket = f"down-{uuid.uuid4().hex[:8]}"
    prefix = f"s3://{bucket}/capture"
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url, region="us-east-1", max_attempts=1)
    config = CaptureConfig(sampling_percentage=100)
    first = CaptureWriter(prefix, config, storage, retry_initial_s=0.05, retry_max_s=0.1, close_upload_s=0.3)
    at = dt.datetime(2026, 11, 30, 11, 0, 0, tzinfo=dt.UTC)
    for second in range(4):
        first.offer(exchange(at + dt.timedelta(seconds=second), inference_id=f"k{second}"))
    stats = first.close()
    assert stats.captured == 4 and stats.stored == 0 and stats.pending == 4 and stats.pending_files == 1, stats
    assert "NoSuchBucket" in (stats.last_error or "") or "bucket" in (stats.last_error or "").lower(), stats
    (staged,) = staging_root(prefix).rglob("*.jsonl")
    assert len(staged.read_bytes().splitlines()) == 4, "the only copy stays staged"

    boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    second = CaptureWriter(prefix, config, storage, retry_initial_s=0.05)  # the router's next start
    assert second.stats.recovered == 4
    wait_until(lambda: second.stats.stored == 4, what="the picked-up file to be uploaded")
    second.offer(exchange(at + dt.timedelta(seconds=10), inference_id="after"))
    second.close()
    assert second.stats.stored == 5 and second.stats.pending == 0
    read = read_capture(storage, prefix)
    assert [r.inference_id for r in read.records] == ["k0", "k1", "k2", "k3", "after"] and read.problems == []
    assert list(tmp_path.iterdir()) == [], "nothing left staged"


def test_a_killed_writers_staged_records_are_uploaded_by_the_next_one(
    s3_server: LoopbackS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router killed with records staged (SIGKILL: no close): its lock dies with it, the next writer adopts them."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bucket = f"killed-{uuid.uuid4().hex[:8]}"
    prefix = f"s3://{bucket}/capture"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    script = f"""
import datetime as dt, os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from waiting import wait_until
from bincount.capture import CaptureWriter, Exchange
from bincount.contracts.serving import CaptureConfig
from bincount.storage import Storage
storage = Storage(s3_endpoint_url={s3_server.endpoint_url!r})
writer = CaptureWriter({prefix!r}, CaptureConfig(sampling_percentage=100), storage)
at = dt.datetime(2026, 11, 30, 12, 0, 0, tzinfo=dt.UTC)
for second in range(3):
    writer.offer(Exchange(b"", "image/jpeg", b"{{}}", "application/json", 200, 1.0, at, f"x{{second}}"))
wait_until(lambda: writer.stats.captured == 3)
os.kill(os.getpid(), signal.SIGKILL)
"""
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url, region="us-east-1")
    assert read_capture(storage, prefix).records == [], "nothing was uploaded before the kill"
    writer = CaptureWriter(prefix, CaptureConfig(sampling_percentage=100), storage)
    assert writer.stats.recovered == 3
    writer.close()
    assert writer.stats.stored == 3 and writer.stats.pending == 0
    assert [r.inference_id for r in read_capture(storage, prefix).records] == ["x0", "x1", "x2"]
    assert list(tmp_path.iterdir()) == [], "nothing left staged"


def test_bad_capture_files_are_listed_and_skipped(tmp_path: Path) -> None:
    prefix = (tmp_path / "capture").as_uri()
    writer = CaptureWriter(prefix, CaptureConfig(sampling_percentage=100), Storage())
    at = dt.datetime(2026, 11, 30, 10, 0, 0, tzinfo=dt.UTC)
    for second in range(3):
        writer.offer(exchange(at + dt.timedelta(seconds=second), inference_id=f"ok{second}"))
    writer.close()
    (path,) = (tmp_path / "capture").rglob("*.jsonl")
    lines = path.read_text().splitlines()
    no_data = json.loads(lines[0])
    del no_data["captureData"]
    no_data["eventMetadata"]["inferenceTime"] = "2026-11-30T10:00:05.000Z"
    no_output = json.loads(lines[0])
    del no_output["captureData"]["endpointOutput"]
    foreign = ["[1, 2, 3]", "garbage {", json.dumps(no_data), json.dumps(no_output)]
    path.write_text("\n".join([lines[0], *foreign, *lines[1:]]) + "\n" + '{"captureData": {"endpointInput"')
    newer = json.loads(lines[0])
    newer["eventVersion"] = "7"
    (path.parent / "newer.jsonl").write_text(json.dumps(newer) + "\n")
    (tmp_path / "capture" / "README.txt").write_text("not capture")
    reader = CaptureReader(Storage(), prefix)
    assert sorted(r.inference_id or "" for r in reader) == ["ok0", "ok1", "ok2"]
    problems = "\n".join(reader.problems)
    assert "line 2: not a capture record (not a JSON object)" in problems
    assert "line 3: not JSON: skipped" in problems
    assert "line 4: not a capture record (no captureData)" in problems
    assert "line 5: not a capture record (no captureData.endpointOutput.data)" in problems
    assert "line 8: not JSON (the last line, cut short" in problems
    assert "eventVersion 7 is newer" in problems
    assert "README.txt: not a capture file" in problems
    assert reader.skipped == 7 and len(reader.problems) == 7
    assert reader.latest == dt.datetime(2026, 11, 30, 10, 0, 5, tzinfo=dt.UTC), "the cursor passes the bad lines"


def test_records_as_sagemaker_writes_them_are_read_and_monitored(tmp_path: Path) -> None:
    """SageMaker's own capture lines (no bincount metadata, seconds only) go through the same reader and monitor."""
    image = photos(1)[0]
    line = {
        "captureData": {
            "endpointInput": {
                "observedContentType": "image/jpeg",
                "mode": "INPUT",
                "data": base64.b64encode(image).decode(),
                "encoding": "BASE64",
            },
            "endpointOutput": {
                "observedContentType": "application/json",
                "mode": "OUTPUT",
                "encoding": "JSON",
                "data": '{"predictions": [{"predicted_count": 4, "probabilities": {"4": 1.0}}]}',
            },
        },
        "eventMetadata": {
            "eventId": "b7d5d7e2-0000-4000-8000-000000000000",
            "inferenceId": "00042",
            "inferenceTime": "2026-11-30T21:04:05Z",
        },
        "eventVersion": "0",
    }
    folder = tmp_path / "ep" / "AllTraffic" / "2026" / "11" / "30" / "21"
    folder.mkdir(parents=True)
    (folder / "04-05-000-abc.jsonl").write_text(json.dumps(line) + "\n")
    reader = CaptureReader(Storage(), (tmp_path / "ep" / "AllTraffic").as_uri())
    window = TrafficWindow.read(reader)
    assert window.requests == 1 and reader.problems == [] and window.identified == [("00042", 4)]
    report = monitor_window("ep", window, None, DriftThresholds(), labels={"00042": 4})
    assert report.verdict == "no-baseline" and report.predicted_shares["4"] == 1.0 and report.accuracy == 1.0
    assert report.errors == 0 and report.error_rate == 0.0 and report.window_end == "2026-11-30T21:04:05.000Z"
