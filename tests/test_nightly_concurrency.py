"""One nightly at a time, through the deployment: two `nightly-retrain/nightly` runs created at once on a real
Prefect server, picked up by one process worker; the second waits for the first (the deployment's concurrency
limit, ENQUEUE) instead of running beside it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from conftest import PREFECT
from test_deployments import run
from waiting import wait_until

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def quick_slot_retry() -> Iterator[None]:
    """A run refused a slot is tried again after 1 s (default 30 s): set before the module's server starts."""
    environment = pytest.MonkeyPatch()
    environment.setenv("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "1")
    yield
    environment.undo()


def api(env: dict[str, str], method: str, path: str, body: dict | None = None) -> dict | list:
    answer = httpx.request(method, f"{env['PREFECT_API_URL']}{path}", json=body, timeout=10)
    answer.raise_for_status()
    return answer.json()


def when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_two_nightly_runs_started_at_once_run_one_after_the_other(
    quick_slot_retry: None, server_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**server_env, "BINCOUNT_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    run([sys.executable, "-m", "deployments.setup"], env)
    run([PREFECT, "--no-prompt", "deploy", "--name", "nightly"], env)
    deployment = api(env, "GET", "/deployments/name/nightly-retrain/nightly")
    runs = [api(env, "POST", f"/deployments/{deployment['id']}/create_flow_run", {}) for _ in range(2)]

    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "bincount-local"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        finished = wait_until(
            lambda: (
                (found := [api(env, "GET", f"/flow_runs/{r['id']}") for r in runs])
                and all(f["state_type"] in FINAL for f in found)
                and found
            ),
            timeout_s=180,
            interval_s=1,
            what="both nightly runs to finish",
        )
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    # Nothing is in production here, so each run fails at once, having run the nightly's code: enough to time them.
    assert all("run the pipeline first" in (f["state"]["message"] or "") for f in finished), finished
    first, second = sorted(finished, key=lambda f: when(f["start_time"]))
    assert when(second["start_time"]) >= when(first["end_time"]), "the second started only once the first ended"
    states = api(env, "GET", f"/flow_run_states/?flow_run_id={second['id']}")
    assert "AwaitingConcurrencySlot" in [state["name"] for state in states], "it waited for the deployment's slot"
