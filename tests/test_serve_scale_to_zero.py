"""Scale to zero on a local endpoint: min_replicas 0 stops the hosts when idle, the next request starts one and
is answered (and captured); /ping stays healthy meanwhile; a host that cannot start gets a 503 with Retry-After;
settings that cannot work are refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import botocore.exceptions
import httpx
import numpy as np
import pytest
from waiting import wait_until

from bincount.capture import CaptureReader, capture_prefix
from bincount.config import Settings
from bincount.contracts.router import RouterState, RouterStatus
from bincount.contracts.serving import CaptureConfig, DeployError, EndpointRecord, RolloutStrategy, ScalingConfig
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.local.host import HostOptions
from bincount.local.processes import is_ours
from bincount.local.serving import STATE_FILE, LocalServingBackend, runtime_client
from bincount.models import write_untrained_model_dir
from bincount.monitoring import TrafficWindow
from bincount.storage import Storage
from flows.cli import health
from sm_scripts import inference

NAME = "idle-bins"
IDLE_S = 3.0  # short for the test; long enough that a deploy's smoke check meets a running host
TO_ZERO_S = 90.0  # generous: the idle time, then the host's drain, on a busy machine


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings.load(artifact_root=str(tmp_path_factory.mktemp("artifacts")))


@pytest.fixture(scope="module")
def backend(settings: Settings) -> Iterator[LocalServingBackend]:
    serving = LocalServingBackend(settings, host_options=HostOptions(max_batch_size=8, max_wait_ms=5, threads=1))
    yield serving
    for record_file in (Path(settings.artifact_root.removeprefix("file://")) / "endpoints").glob("*.json"):
        serving.delete(record_file.stem)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_untrained_model_dir(tmp_path_factory.mktemp("model") / "m", "resnet18", 32, seed=1)


@pytest.fixture(scope="module")
def endpoint(backend: LocalServingBackend, model: Path) -> EndpointRecord:
    scaling = ScalingConfig(min_replicas=0, max_replicas=1, scale_in_idle_seconds=IDLE_S)
    return backend.deploy(NAME, model.as_uri(), "idle:1", CaptureConfig(sampling_percentage=100), scaling=scaling)


def router_status(backend: LocalServingBackend, record: EndpointRecord) -> RouterStatus:
    status = backend._router_status(record.url, record.name)
    assert status is not None, f"the router of {record.name} does not answer"
    return status


def host_pids(status: RouterStatus) -> list[int]:
    current = status.current_variant
    return [replica.pid for replica in current.replicas] if current is not None else []


def started_hosts(backend: LocalServingBackend, record: EndpointRecord) -> set[int]:
    """Every model host the endpoint's router has started (each leaves its log, named by its pid)."""
    return {int(log.stem.removeprefix("host-")) for log in (backend.runtime_root / record.name).glob("host-[0-9]*.log")}


def wait_for_zero(backend: LocalServingBackend, record: EndpointRecord) -> RouterStatus:
    """Until the router says scaled to zero and every host process it started is gone."""

    def at_zero() -> RouterStatus | None:
        status = router_status(backend, record)
        pids = started_hosts(backend, record)
        gone = status.scaled_to_zero and not host_pids(status) and not any(is_ours(pid) for pid in pids)
        return status if gone else None

    return wait_until(at_zero, timeout_s=TO_ZERO_S, what=f"{record.name} to scale to zero")


def photo(count: int) -> bytes:
    return jpeg_bytes(render_bin_image(count, np.random.default_rng(count), size=48))


def test_an_idle_endpoint_stops_its_hosts_and_the_next_invoke_starts_one_and_is_captured(
    settings: Settings, backend: LocalServingBackend, endpoint: EndpointRecord, model: Path
) -> None:
    at_zero = wait_for_zero(backend, endpoint)
    pids = started_hosts(backend, endpoint)
    assert len(pids) == 1, f"one host served the new endpoint, then stopped: {pids}"
    assert [(event.scaled, event.replicas) for event in at_zero.scaling_events] == [("in", 0)]
    ping = httpx.get(f"{endpoint.url}/ping", timeout=10)
    assert ping.status_code == 200 and ping.json()["scaled_to_zero"] is True, ping.text
    assert ping.json()["model_version"] == "idle:1"
    assert "scaled to zero" in health(endpoint)
    assert started_hosts(backend, endpoint) == pids, "a health check must not start a host"

    image = photo(3)
    client = runtime_client(endpoint.url, max_attempts=1)
    answer = client.invoke_endpoint(EndpointName=NAME, Body=image, ContentType="image/jpeg", InferenceId="cold-1")
    (prediction,) = json.loads(answer["Body"].read())["predictions"]
    woken = router_status(backend, endpoint)  # (it may be back at zero already on a slow machine: idle is short)
    assert [event.scaled for event in woken.scaling_events][:2] == ["in", "out"], woken.scaling_events
    assert len(started_hosts(backend, endpoint) - pids) == 1, "one new host answered"
    loaded = inference.model_fn(str(model))
    (expected,) = inference.predict_fn(inference.input_fn(image, "image/jpeg"), loaded)
    assert prediction["predicted_count"] == expected["predicted_count"]
    probabilities = list(prediction["probabilities"].values())
    assert probabilities == pytest.approx(list(expected["probabilities"].values()), abs=1e-4)

    # the capture (and the monitor reading it) sees the request that woke the endpoint
    def captured() -> bool:
        capture = router_status(backend, endpoint).capture
        return capture is not None and capture.captured >= 1

    wait_until(captured, what="the request's capture")
    window = TrafficWindow.read(CaptureReader(Storage(), capture_prefix(settings.artifact_root, NAME)))
    assert window.requests == 1 and window.model_errors == 0, window.problems
    assert window.identified == [("cold-1", prediction["predicted_count"])]


def test_a_host_that_cannot_start_from_zero_gets_a_503_with_retry_after(
    backend: LocalServingBackend, tmp_path: Path
) -> None:
    model = write_untrained_model_dir(tmp_path / "fragile", "resnet18", 32, seed=2)
    scaling = ScalingConfig(min_replicas=0, scale_in_idle_seconds=IDLE_S, cold_start_timeout_s=120)
    record = backend.deploy("fragile", model.as_uri(), scaling=scaling)
    wait_for_zero(backend, record)
    state_file = backend.runtime_root / "fragile" / STATE_FILE
    state = RouterState.from_dict(json.loads(state_file.read_text()))
    served = Path(state.variants[state.current].model_dir)
    weights = served / "model.pt"
    weights.write_bytes(weights.read_bytes()[:5000])  # the model the host would load is damaged while at zero
    before = started_hosts(backend, record)

    client = runtime_client(record.url, max_attempts=1)
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.invoke_endpoint(EndpointName="fragile", Body=photo(2), ContentType="image/jpeg")
    error = caught.value.response
    assert error["Error"]["Code"] == "ServiceUnavailable", error
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert error["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "5"
    assert "scaled to zero" in error["Error"]["Message"] and "model host" in error["Error"]["Message"], error
    assert len(started_hosts(backend, record) - before) == 1, "one try per request: the next request tries again"
    assert httpx.get(f"{record.url}/ping", timeout=10).status_code == 200  # the router still answers


def test_settings_that_cannot_scale_to_zero_are_refused(
    backend: LocalServingBackend, endpoint: EndpointRecord, model: Path
) -> None:
    with pytest.raises(ValueError, match="scale_in_idle_seconds -1 must be positive"):
        ScalingConfig(min_replicas=0, scale_in_idle_seconds=-1)
    with pytest.raises(ValueError, match="min_replicas -1 must be 0"):
        ScalingConfig(min_replicas=-1)
    with pytest.raises(ValueError, match="cold_start_timeout_s 0 must be positive"):
        ScalingConfig(min_replicas=0, cold_start_timeout_s=0)

    before = router_status(backend, endpoint)
    for strategy in (RolloutStrategy("canary", bake_seconds=5), RolloutStrategy("shadow", traffic_percent=50)):
        with pytest.raises(DeployError, match="needs its models running, and min_replicas 0 stops them"):
            backend.deploy(NAME, model.as_uri(), "idle:2", strategy=strategy)  # keeps the endpoint's min_replicas 0

    wait_for_zero(backend, endpoint)
    with pytest.raises(DeployError, match="is scaled to zero, and a linear rollout"):
        backend.deploy(
            NAME,
            model.as_uri(),
            "idle:2",
            strategy=RolloutStrategy("linear", traffic_percent=50, bake_seconds=5),
            scaling=ScalingConfig(min_replicas=1),
        )
    after = router_status(backend, endpoint)
    assert (after.current, after.candidate) == (before.current, None), "a refused deploy changes nothing"
