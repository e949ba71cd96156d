"""Automations on a real Prefect server with a worker: a drift event starts a harvest that asks for a retrain;
a nightly run's failure (nothing in production yet) reaches a webhook receiver on loopback as a notification;
the rollback automation acts only on an error rate of the endpoint that was promoted."""

from __future__ import annotations

import sys

import httpx
import pytest
from conftest import PREFECT
from test_deployments import run
from waiting import wait_until


def flow_runs(env: dict[str, str], deployment_name: str) -> list[dict]:
    deployment = httpx.get(f"{env['PREFECT_API_URL']}/deployments/name/{deployment_name}", timeout=10).json()
    query = {"deployments": {"id": {"any_": [deployment["id"]]}}}
    return httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json=query, timeout=10).json()


def automation_runs(env: dict[str, str], deployment_name: str) -> list[dict]:
    return [r for r in flow_runs(env, deployment_name) if (r.get("created_by") or {}).get("type") == "AUTOMATION"]


@pytest.fixture(scope="module")
def deployed(server_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The work pool, blocks and every deployment on the module's server; the environment to reach them."""
    root = tmp_path_factory.mktemp("automations")
    env = {**server_env, "BINCOUNT_ARTIFACT_ROOT": str(root / "artifacts"), "BINCOUNT_DATA_DIR": str(root / "raw")}
    run([sys.executable, "-m", "deployments.setup"], env)
    run([PREFECT, "--no-prompt", "deploy", "--all"], env)
    return env


def automation_names(env: dict[str, str]) -> list[str]:
    return [a["name"] for a in httpx.post(f"{env['PREFECT_API_URL']}/automations/filter", json={}, timeout=10).json()]


def test_drift_starts_a_harvest_that_asks_for_a_retrain_and_setup_retires_the_direct_retrain(
    deployed: dict[str, str],
) -> None:
    env = deployed
    emit_retired = (
        "from prefect.automations import Automation, EventTrigger\n"
        "Automation(name='bincount-drift-retrain', trigger=EventTrigger(expect={'never'}), actions=[]).create()\n"
    )
    run([sys.executable, "-c", emit_retired], env)  # as an earlier version's setup left it
    created = run([sys.executable, "-m", "deployments.setup", "--automations"], env)
    assert "bincount-drift-harvest" in created and "bincount-harvested-retrain" in created
    run([sys.executable, "-m", "deployments.setup", "--automations"], env)  # again: replaced, not doubled
    names = automation_names(env)
    assert names.count("bincount-drift-harvest") == 1 and "bincount-drift-retrain" not in names, names

    emit = (
        "from prefect.events import emit_event\n"
        "emit_event(event='bincount.monitor.drift-detected', "
        "resource={'prefect.resource.id': 'bincount.endpoint.bincount', 'prefect.resource.name': 'bincount'}, "
        "payload={'verdict': 'drift'})\n"
    )
    run([sys.executable, "-c", emit], env)
    started = wait_until(
        lambda: automation_runs(env, "harvest-feedback/daily"),
        timeout_s=60,
        interval_s=1,
        what="the drift automation to create a harvest run",
    )
    assert started[0]["parameters"]["endpoint_name"] == "bincount" and started[0]["parameters"]["then_retrain"] is True
    assert automation_runs(env, "nightly-retrain/nightly") == []  # the nightly waits for the harvest's event


def test_a_failed_nightly_and_a_missed_one_notify_the_webhook(
    deployed: dict[str, str], webhook: tuple[str, list[dict]]
) -> None:
    url, received = webhook
    env = deployed
    # the missed-nightly window shortened to 12 s so that it fires during the test
    created = run(
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
    assert "bincount-run-failed" in created and "bincount-nightly-missed" in created
    started = run([PREFECT, "deployment", "run", "nightly-retrain/nightly"], env)
    run([PREFECT, "worker", "start", "--pool", "bincount-local", "--run-once"], env, timeout=300)

    def failures() -> list[dict]:
        return [m for m in received if "Failed" in m["subject"]]

    wait_until(
        lambda: failures() and any("no nightly retrain completed" in m["subject"] for m in received),
        timeout_s=90,
        interval_s=0.5,
        what=f"the failure and missed-nightly notifications (received: {received})",
    )
    (message,) = failures()
    (run_id,) = [r["id"] for r in flow_runs(env, "nightly-retrain/nightly") if r["id"] in started]
    assert "nightly-retrain" in message["subject"] and run_id in message["body"], message


def test_the_rollback_automation_acts_only_on_errors_of_the_endpoint_that_was_promoted(
    deployed: dict[str, str],
) -> None:
    """A promotion on alpha, then error-rate-high on beta (no rollback: beta was not promoted), then on alpha
    (alpha is rolled back). Each event declares the one before it (``follows``), so the server evaluates them
    in that order: when alpha's rollback exists, beta's event has been evaluated too."""
    env = deployed
    created = run([sys.executable, "-m", "deployments.setup", "--automations"], env)
    assert "bincount-error-rate-rollback" in created
    emit = (
        "from prefect.events import emit_event\n"
        "def about(kind, name):\n"
        "    return {'prefect.resource.id': f'bincount.{kind}.{name}', 'prefect.resource.name': name}\n"
        "promoted = emit_event(event='bincount.model.promoted', resource=about('model-group', 'alpha'))\n"
        "other = emit_event(event='bincount.monitor.error-rate-high', resource=about('endpoint', 'beta'), "
        "follows=promoted)\n"
        "emit_event(event='bincount.monitor.error-rate-high', resource=about('endpoint', 'alpha'), follows=other)\n"
    )
    run([sys.executable, "-c", emit], env)
    rollbacks = wait_until(
        lambda: automation_runs(env, "rollback-model/on-demand"),
        timeout_s=60,
        interval_s=1,
        what="the rollback automation to create a rollback run for alpha",
    )
    assert [r["parameters"]["endpoint_name"] for r in rollbacks] == ["alpha"], rollbacks
    assert rollbacks[0]["parameters"]["actor"] == "automation"
