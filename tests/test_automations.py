"""Automations on a real Prefect server with a worker: a drift event starts a nightly run, whose failure
(nothing in production yet) reaches a webhook receiver on loopback as a notification."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from test_deployments import PREFECT, run


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A tiny HTTP receiver on loopback; returns its URL and the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()


def flow_runs(env: dict[str, str], deployment_name: str) -> list[dict]:
    deployment = httpx.get(f"{env['PREFECT_API_URL']}/deployments/name/{deployment_name}", timeout=10).json()
    query = {"deployments": {"id": {"any_": [deployment["id"]]}}}
    return httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json=query, timeout=10).json()


def test_drift_starts_a_nightly_run_and_its_failure_notifies_the_webhook(
    server_env: dict[str, str],
    webhook: tuple[str, list[dict]],
    tmp_path: Path,
) -> None:
    url, received = webhook
    env = {
        **server_env,
        "BINCOUNT_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "BINCOUNT_DATA_DIR": str(tmp_path / "raw"),
    }
    run([sys.executable, "-m", "deployments.setup"], env)
    run([PREFECT, "--no-prompt", "deploy", "--all"], env)
    created = run([sys.executable, "-m", "deployments.setup", "--automations", "--notify-url", url], env)
    assert (
        "bincount-drift-retrain" in created
        and "bincount-run-failed" in created
        and "bincount-nightly-missed" in created
    )
    names = {a["name"] for a in httpx.post(f"{env['PREFECT_API_URL']}/automations/filter", json={}, timeout=10).json()}
    assert {
        "bincount-drift-retrain",
        "bincount-run-failed",
        "bincount-nightly-missed",
        "bincount-error-rate-rollback",
    } <= names
    # again: replaced, not doubled; the missed-nightly window shortened to 12 s so that it fires during the test
    run(
        [
            sys.executable,
            "-m",
            "deployments.setup",
            "--automations",
            "--notify-url",
            url,
            "--nightly-missed-after-h",
            "0.0034",
        ],
        env,
    )
    listed = [a["name"] for a in httpx.post(f"{env['PREFECT_API_URL']}/automations/filter", json={}, timeout=10).json()]
    assert listed.count("bincount-drift-retrain") == 1
    assert flow_runs(env, "nightly-retrain/nightly") == [] or all(
        r["state_type"] == "SCHEDULED" for r in flow_runs(env, "nightly-retrain/nightly")
    )

    emit = (
        "from prefect.events import emit_event\n"
        "emit_event(event='bincount.monitor.drift-detected', "
        "resource={'prefect.resource.id': 'bincount.endpoint.bincount', 'prefect.resource.name': 'bincount'}, "
        "payload={'verdict': 'drift'})\n"
    )
    run([sys.executable, "-c", emit], env)
    deadline = time.monotonic() + 60
    while not (
        started := [
            r
            for r in flow_runs(env, "nightly-retrain/nightly")
            if (r.get("created_by") or {}).get("type") == "AUTOMATION"
        ]
    ):
        assert time.monotonic() < deadline, "the drift automation created no nightly run"
        time.sleep(1)
    assert started[0]["parameters"]["endpoint_name"] == "bincount"

    run([PREFECT, "worker", "start", "--pool", "bincount-local", "--run-once"], env, timeout=300)
    deadline = time.monotonic() + 90

    def failures() -> list[dict]:
        return [m for m in received if "Failed" in m["subject"]]

    while not (failures() and any("no nightly retrain completed" in m["subject"] for m in received)):
        assert time.monotonic() < deadline, f"notifications missing: {received}"
        time.sleep(0.5)
    (message,) = failures()
    assert "nightly-retrain" in message["subject"] and started[0]["name"] in message["body"], message

    # a promotion, then an error rate above the monitor's threshold: the rollback deployment is run
    emit_sequence = (
        "import time\n"
        "from prefect.events import emit_event\n"
        "emit_event(event='bincount.model.promoted', resource={'prefect.resource.id': 'bincount.model-group.bincount', "
        "'prefect.resource.name': 'bincount'})\n"
        "time.sleep(2)\n"
        "emit_event(event='bincount.monitor.error-rate-high', "
        "resource={'prefect.resource.id': 'bincount.endpoint.bincount', 'prefect.resource.name': 'bincount'})\n"
    )
    run([sys.executable, "-c", emit_sequence], env)
    deadline = time.monotonic() + 60
    while not (
        rollbacks := [
            r
            for r in flow_runs(env, "rollback-model/on-demand")
            if (r.get("created_by") or {}).get("type") == "AUTOMATION"
        ]
    ):
        assert time.monotonic() < deadline, "the rollback automation created no rollback run"
        time.sleep(1)
    assert (
        rollbacks[0]["parameters"]["endpoint_name"] == "bincount"
        and rollbacks[0]["parameters"]["actor"] == "automation"
    )
