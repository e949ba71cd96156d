"""A local endpoint over real HTTP: boto3's sagemaker-runtime client, bad input, load, blue/green, drain."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import botocore.exceptions
import httpx
import pytest
from PIL import Image
from waiting import wait_until

from bincount.config import Settings
from bincount.contracts.serving import DeployError, EndpointNotFoundError, EndpointRecord
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend, runtime_client
from bincount.models import pack_folder, write_untrained_model_dir
from sm_scripts import inference

NAME = "bins"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different tiny models (one packed as model.tar.gz, one a folder) and a broken one."""
    root = tmp_path_factory.mktemp("models")
    blue = pack_folder(write_untrained_model_dir(root / "blue", "resnet18", 32, seed=1), root / "blue.tar.gz")
    green = write_untrained_model_dir(root / "green", "resnet18", 32, seed=2)
    broken = write_untrained_model_dir(root / "broken", "resnet18", 32, seed=3)
    (broken / "model.pt").write_bytes((broken / "model.pt").read_bytes()[:5000])  # truncated weights
    return {"blue": blue, "green": green, "blue_dir": root / "blue", "broken": broken}


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServingBackend]:
    settings = Settings.load(artifact_root=str(tmp_path_factory.mktemp("artifacts")))
    serving = LocalServingBackend(settings, host_options=HostOptions(max_batch_size=8, max_wait_ms=5, threads=1))
    yield serving
    for record_file in (Path(settings.artifact_root.removeprefix("file://")) / "endpoints").glob("*.json"):
        serving.delete(record_file.stem)


@pytest.fixture(scope="module")
def endpoint(backend: LocalServingBackend, models: dict[str, Path]) -> EndpointRecord:
    return backend.deploy(NAME, models["blue"].as_uri())


@pytest.fixture(scope="module")
def photo(abid_dir: Path) -> bytes:
    return (abid_dir / "bucket" / "bin-images" / "01000.jpg").read_bytes()


def expected_probabilities(model_dir: Path, image: bytes) -> list[float]:
    model = inference.model_fn(str(model_dir))
    prediction = inference.predict_fn(inference.input_fn(image, "image/jpeg"), model)[0]
    return list(prediction["probabilities"].values())


def test_boto3_invoke_endpoint_answers_a_count_for_a_real_abid_photo(endpoint: EndpointRecord, photo: bytes) -> None:
    client = runtime_client(endpoint.url, max_attempts=1)
    answer = client.invoke_endpoint(EndpointName=NAME, Body=photo, ContentType="image/jpeg", Accept="application/json")
    assert answer["ContentType"] == "application/json"
    (prediction,) = json.loads(answer["Body"].read())["predictions"]
    assert prediction["predicted_count"] in (1, 2, 3, 4, 5)
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

    csv = client.invoke_endpoint(EndpointName=NAME, Body=photo, ContentType="image/jpeg", Accept="text/csv")
    assert csv["ContentType"] == "text/csv"
    assert int(csv["Body"].read().decode().split(",")[0]) == prediction["predicted_count"]
    assert httpx.get(f"{endpoint.url}/ping").status_code == 200


def test_bad_requests_get_clear_4xx_and_the_server_still_answers(endpoint: EndpointRecord, photo: bytes) -> None:
    client = runtime_client(endpoint.url, max_attempts=1)
    bad_cases = [
        (os.urandom(4096), "image/jpeg", 400, "not a JPEG or PNG"),
        (photo[: len(photo) // 2], "image/jpeg", 400, "not a readable JPEG or PNG"),
        (b"", "image/jpeg", 400, "empty"),
        (photo, "text/plain", 415, "not supported"),
        (b'{"images": [', "application/json", 400, "not valid JSON"),
    ]
    for body, content_type, status, says in bad_cases:
        with pytest.raises(botocore.exceptions.ClientError) as caught:
            client.invoke_endpoint(EndpointName=NAME, Body=body, ContentType=content_type)
        error = caught.value.response
        assert error["Error"]["Code"] == "ModelError", error
        assert error["OriginalStatusCode"] == status and says in error["OriginalMessage"], error

    too_big = os.urandom(7 * 1024 * 1024)
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.invoke_endpoint(EndpointName=NAME, Body=too_big, ContentType="image/jpeg")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert "6 MB" in caught.value.response["Error"]["Message"]
    with pytest.raises(client.exceptions.ValidationError, match="not found"):
        client.invoke_endpoint(EndpointName="other-endpoint", Body=photo, ContentType="image/jpeg")

    # the container route answers the model's own status (through the router, and on the host itself)
    for url in (endpoint.url, endpoint.details["host_url"]):
        for body, content_type, status in [
            (too_big, "image/jpeg", 413),
            (b"", "image/png", 400),
            (photo, "text/csv", 415),
        ]:
            answer = httpx.post(f"{url}/invocations", content=body, headers={"Content-Type": content_type}, timeout=30)
            assert answer.status_code == status and answer.json()["error"], answer.text
        wrong_accept = httpx.post(
            f"{url}/invocations", content=photo, headers={"Content-Type": "image/jpeg", "Accept": "image/gif"}
        )
        assert wrong_accept.status_code == 406

    answer = client.invoke_endpoint(EndpointName=NAME, Body=photo, ContentType="image/jpeg")
    assert json.loads(answer["Body"].read())["predictions"][0]["predicted_count"] in (1, 2, 3, 4, 5)
    assert _is_running(endpoint.details["host_pid"]) and _is_running(endpoint.details["router_pid"])


def test_a_request_whose_images_decode_past_the_pixel_cap_is_413(endpoint: EndpointRecord) -> None:
    """Three 12-megapixel JPEGs are small on the wire (under 6 MB) but 108 MB decoded: refused before decoding."""
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 3000), (90, 120, 60)).save(buffer, format="JPEG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    body = json.dumps({"images": [encoded] * 3}).encode()
    assert len(body) < 6 * 1024 * 1024
    client = runtime_client(endpoint.url, max_attempts=1)
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.invoke_endpoint(EndpointName=NAME, Body=body, ContentType="application/json")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert f"at most {inference.MAX_REQUEST_PIXELS} pixels" in caught.value.response["Error"]["Message"]
    assert "image 2" in caught.value.response["Error"]["Message"]
    answer = httpx.post(
        f"{endpoint.url}/invocations", content=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert answer.status_code == 413 and "use batch transform" in answer.json()["error"]
    two = json.dumps({"images": [encoded] * 2}).encode()  # 24 MP: within the cap
    assert (
        len(
            json.loads(
                client.invoke_endpoint(EndpointName=NAME, Body=two, ContentType="application/json")["Body"].read()
            )["predictions"]
        )
        == 2
    )


def test_redeploy_under_concurrent_load_fails_no_request(
    backend: LocalServingBackend, endpoint: EndpointRecord, models: dict[str, Path], photo: bytes
) -> None:
    blue = expected_probabilities(models["blue_dir"], photo)
    green = expected_probabilities(models["green"], photo)
    client = runtime_client(endpoint.url, max_attempts=1)  # no retries: every failure counts
    stop = threading.Event()
    answers: list[tuple[float, str]] = []
    errors: list[str] = []

    def which_model(probabilities: list[float]) -> str:
        distance = {
            name: max(abs(a - b) for a, b in zip(probabilities, ref, strict=True))
            for name, ref in (("blue", blue), ("green", green))
        }
        best = min(distance, key=distance.get)
        return best if distance[best] < 1e-3 else f"unknown {probabilities}"

    def client_loop() -> None:
        while not stop.is_set():
            try:
                answer = client.invoke_endpoint(EndpointName=NAME, Body=photo, ContentType="image/jpeg")
                prediction = json.loads(answer["Body"].read())["predictions"][0]
                answers.append((time.monotonic(), which_model(list(prediction["probabilities"].values()))))
            except Exception as error:  # counted: the test asserts there are none
                errors.append(repr(error))

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(answers) >= 10 or errors, what="the clients' first answers from the blue model")
    record = backend.deploy(NAME, models["green"].as_uri())
    switched = time.monotonic()
    wait_until(
        lambda: sum(at > switched + 0.5 for at, _ in answers) >= 10 or errors,
        what="answers after the switch",
    )
    stop.set()
    for thread in threads:
        thread.join()

    assert errors == []
    assert record.url == endpoint.url and record.version != endpoint.version
    assert record.previous_version == endpoint.version
    served = [name for _, name in answers]
    assert set(served) == {"blue", "green"}, set(served)
    assert served.count("blue") > 8 and served.count("green") > 8
    assert all(name == "green" for at, name in answers if at > switched + 0.5)
    assert not _is_running(endpoint.details["host_pid"])  # the old host stopped once drained
    assert backend.describe(NAME).version == record.version


def test_a_model_that_fails_to_start_leaves_the_old_one_serving(
    backend: LocalServingBackend, endpoint: EndpointRecord, models: dict[str, Path], photo: bytes
) -> None:
    before = backend.describe(NAME)
    with pytest.raises(DeployError, match="left as it was") as caught:
        backend.deploy(NAME, models["broken"].as_uri())
    assert "model.pt" in str(caught.value) or "load" in str(caught.value).lower()
    assert backend.describe(NAME) == before
    answer = runtime_client(before.url).invoke_endpoint(EndpointName=NAME, Body=photo, ContentType="image/jpeg")
    assert json.loads(answer["Body"].read())["predictions"][0]["predicted_count"] in (1, 2, 3, 4, 5)


def test_sigterm_drains_the_request_in_flight_then_exits(models: dict[str, Path], photo: bytes) -> None:
    """A request whose body is still arriving when SIGTERM comes is answered; new connections are not."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    host = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bincount.local.host",
            "--model-dir",
            str(models["green"]),
            "--name",
            NAME,
            "--fd",
            str(sock.fileno()),
            "--threads",
            "1",
        ],
        pass_fds=[sock.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sock.close()
    try:

        def pings() -> bool:
            assert host.poll() is None, "the host exited while starting"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(pings, timeout_s=60, interval_s=0.2, what="the host to answer /ping")
        request = socket.create_connection(("127.0.0.1", port))
        request.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            + f"Content-Length: {len(photo)}\r\n\r\n".encode()
            + photo[:1000]
        )
        time.sleep(0.3)
        host.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            socket.create_connection(("127.0.0.1", port), timeout=2)
        request.sendall(photo[1000:])
        response = http.client.HTTPResponse(request)
        response.begin()
        assert response.status == 200
        assert json.loads(response.read())["predictions"][0]["predicted_count"] in (1, 2, 3, 4, 5)
        # uvicorn re-raises the SIGTERM once drained, so the exit status is the signal's, as for any service
        assert host.wait(timeout=30) == -signal.SIGTERM
        log = host.stdout.read().decode()
        assert "Finished server process" in log and "stopped after 1 batches, 1 images" in log, log
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


def test_a_redeploy_never_signals_a_process_that_is_not_the_router(
    backend: LocalServingBackend, endpoint: EndpointRecord, models: dict[str, Path]
) -> None:
    """A router pid in the record that now names another process (a reused pid) gets no SIGHUP."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # SIGHUP would end it
    record = backend.describe(NAME)
    forged = {**record.to_dict(), "details": {**record.details, "router_pid": stranger.pid}}
    backend.storage.write_bytes(backend.records.uri(NAME), json.dumps(forged).encode())
    try:
        with pytest.raises(
            DeployError, match=rf"pid {stranger.pid}, recorded as the router of '{NAME}', is not that router"
        ):
            backend.deploy(NAME, models["green"].as_uri())
        time.sleep(0.2)
        assert stranger.poll() is None
        assert httpx.get(f"{record.url}/router/status").json()["target"] == record.details["host_url"]
    finally:
        backend.storage.write_bytes(backend.records.uri(NAME), json.dumps(record.to_dict()).encode())
        stranger.kill()
        stranger.wait()


def test_delete_stops_the_endpoint_and_forgets_it(backend: LocalServingBackend, models: dict[str, Path]) -> None:
    record = backend.deploy("short-lived", models["blue"].as_uri())
    assert httpx.get(f"{record.url}/ping").status_code == 200
    backend.delete("short-lived")
    with pytest.raises(EndpointNotFoundError):
        backend.describe("short-lived")
    assert not _is_running(record.details["router_pid"]) and not _is_running(record.details["host_pid"])
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{record.url}/ping", timeout=2)


def test_a_replica_stops_by_itself_when_its_router_is_killed(
    backend: LocalServingBackend, models: dict[str, Path]
) -> None:
    record = backend.deploy("orphaned", models["blue"].as_uri())
    host_pid = record.details["host_pid"]
    os.kill(record.details["router_pid"], signal.SIGKILL)  # no chance to stop its replicas
    wait_until(lambda: not _is_running(host_pid), interval_s=0.2, what="the replica to stop after its router")
    backend.delete("orphaned")
    with pytest.raises(EndpointNotFoundError):
        backend.describe("orphaned")


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
