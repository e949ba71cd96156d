"""The records the local backend and its router exchange: the JSON of both is the one written before they were typed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bincount.contracts.router import (
    UNRECORDED_REPLICA_CAPACITY,
    RouterState,
    RouterStateError,
    RouterStatus,
    VariantSpec,
)
from bincount.contracts.serving import CaptureConfig, ScalingConfig, TrafficStats

# as a running endpoint's backend wrote it before RouterState (and before scaling, capture and replica_capacity)
OLD_STATE = {
    "bind_host": "127.0.0.1",
    "workdir": "/srv/serving/bins",
    "host_args": ["--threads", "1"],
    "variants": {
        "a1-1f2e3d": {"model_dir": "/m/a1", "version": "a1", "model_uri": "file:///r/a1", "model_ref": "bincount:1"},
        "b2-4c5b6a": {"model_dir": "/m/b2", "version": "b2", "model_uri": "file:///r/b2", "model_ref": None},
    },
    "current": "a1-1f2e3d",
    "candidate": "b2-4c5b6a",
    "mode": "shadow",
    "percent": 50,
}

# /router/status as operators have curled it (the shape must not change)
STATUS: dict[str, Any] = {
    "name": "bins",
    "current": "a1-1f2e3d",
    "candidate": "b2-4c5b6a",
    "mode": "canary",
    "percent": 10,
    "target": "http://127.0.0.1:40001",
    "version": "a1",
    "variants": {
        "a1-1f2e3d": {
            "version": "a1",
            "model_ref": "bincount:1",
            "model_uri": "file:///r/a1",
            "replicas": [{"url": "http://127.0.0.1:40001", "pid": 11, "inflight": 2, "ready": True}],
            "ready": 1,
            "waiting": 0,
            "restarts": 0,
            "failed": None,
            "requests": 90,
            "errors": 1,
            "error_rate": 1 / 90,
            "p99_ms": 41.5,
            "compared": 0,
            "agreed": 0,
            "skipped": 0,
        },
        "b2-4c5b6a": {
            "version": "b2",
            "model_ref": None,
            "model_uri": "file:///r/b2",
            "replicas": [],
            "ready": 0,
            "waiting": 3,
            "restarts": 2,
            "failed": "the model host exited with code 1 while starting",
            "requests": 0,
            "errors": 0,
            "error_rate": 0.0,
            "p99_ms": None,
            "compared": 0,
            "agreed": 0,
            "skipped": 0,
        },
    },
    "scaling": ScalingConfig(min_replicas=0, max_replicas=2).to_dict(),
    "scaled_to_zero": False,
    "scaling_events": [
        {"at": "2026-12-07T21:00:00.000+00:00", "scaled": "in", "replicas": 0, "in_flight_per_replica": 0.0}
    ],
    "capture": {
        "offered": 5,
        "captured": 4,
        "stored": 4,
        "pending": 0,
        "pending_files": 0,
        "recovered": 0,
        "dropped": 1,
        "failed": 0,
        "files": 1,
        "upload_failures": 0,
        "last_error": None,
    },
}


def test_a_state_file_written_before_the_records_loads_with_the_defaults_it_lacked() -> None:
    state = RouterState.from_dict(OLD_STATE)
    assert state.routing == ("a1-1f2e3d", "b2-4c5b6a", "shadow", 50)
    assert state.variants["a1-1f2e3d"] == VariantSpec("/m/a1", "a1", "file:///r/a1", "bincount:1")
    assert state.scaling == ScalingConfig() and state.capture is None
    assert state.replica_capacity == UNRECORDED_REPLICA_CAPACITY and state.host_args == ("--threads", "1")


def test_a_state_survives_its_json_and_keeps_the_keys_routers_read() -> None:
    state = RouterState.from_dict(
        {**OLD_STATE, "capture": {"config": CaptureConfig(sampling_percentage=5).to_dict(), "destination": "s3://b/c"}}
    )
    written = json.loads(json.dumps(state.to_dict()))
    assert RouterState.from_dict(written) == state
    assert set(OLD_STATE) < set(written) and written["variants"] == OLD_STATE["variants"]
    assert written["capture"]["config"]["sampling_percentage"] == 5 and written["capture"]["destination"] == "s3://b/c"


@pytest.mark.parametrize(
    ("broken", "said"),
    [
        ({key: value for key, value in OLD_STATE.items() if key != "variants"}, "'variants'"),
        ({**OLD_STATE, "current": "gone"}, "the current variant 'gone' is not one of the variants"),
    ],
)
def test_a_state_that_is_not_one_says_what_to_do(broken: dict[str, Any], said: str) -> None:
    with pytest.raises(RouterStateError, match=r"router\.json") as caught:
        RouterState.from_dict(broken, "router.json")
    assert said in str(caught.value) and "deploy" in str(caught.value)


def test_the_status_json_keeps_its_shape_and_reads_as_records() -> None:
    status = RouterStatus.from_dict(STATUS)
    assert json.loads(json.dumps(status.to_dict())) == STATUS
    current, candidate = status.current_variant, status.candidate_variant
    assert current is not None and candidate is not None
    assert current.traffic == TrafficStats(90, 1, 41.5) and current.replicas[0].pid == 11
    assert candidate.failed and candidate.waiting == 3
    assert (status.weight("a1-1f2e3d"), status.weight("b2-4c5b6a"), status.weight("retired")) == (90, 10, 0)
    assert status.capture is not None and status.capture.dropped == 1
    assert [(event.scaled, event.replicas) for event in status.scaling_events] == [("in", 0)]


def test_a_shadow_answers_nothing_and_a_router_from_before_scale_to_zero_reads_as_never_scaled() -> None:
    old = {key: value for key, value in STATUS.items() if key not in ("scaled_to_zero", "scaling_events")}
    status = RouterStatus.from_dict({**old, "mode": "shadow"})
    assert (status.weight("a1-1f2e3d"), status.weight("b2-4c5b6a")) == (100, 0)
    assert status.scaled_to_zero is False and status.scaling_events == ()
