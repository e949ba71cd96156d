"""A failure notification as the person paged reads it: the webhook's body links to the failed run in the
Prefect UI (the address `python -m deployments.setup` was given), and that link opens."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import PREFECT
from test_deployments import ROOT, run
from waiting import wait_until

from deployments.automations import AutomationSetupError, ui_address


def test_a_failed_nightly_notification_links_to_its_run(
    server_env: dict[str, str], webhook: tuple[str, list[dict]], tmp_path: Path
) -> None:
    url, received = webhook
    env = {**server_env, "BINCOUNT_ARTIFACT_ROOT": str(tmp_path / "artifacts")}
    run([sys.executable, "-m", "deployments.setup"], env)
    run(
        [
            PREFECT,
            "--no-prompt",
            "deploy",
            "--name",
            "nightly-retrain/nightly",
            "--name",
            "rollback-model/on-demand",
            "--name",
            "harvest-feedback/daily",
        ],
        env,
    )
    created = run([sys.executable, "-m", "deployments.setup", "--automations", "--notify-url", url], env)
    ui = env["PREFECT_API_URL"].removesuffix("/api")
    assert f"notifications link runs at {ui}/runs/flow-run/<id>" in created, created

    # the real nightly, with nothing in production: it fails
    nightly = "from flows.nightly import nightly_retrain\nnightly_retrain()\n"
    failed = subprocess.run([sys.executable, "-c", nightly], env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert failed.returncode != 0, "the nightly fails with no production version"

    (message,) = wait_until(
        lambda: [m for m in received if "Failed" in m["subject"]], timeout_s=120, what="the failure notification"
    )
    assert "nightly-retrain" in message["subject"] and "None" not in message["body"], message
    link = re.search(r"(http://\S+)/runs/flow-run/([0-9a-f-]{36})\b", message["body"])
    assert link and link[1] == ui, message["body"]
    query = {"flows": {"name": {"any_": ["nightly-retrain"]}}, "flow_runs": {"state": {"type": {"any_": ["FAILED"]}}}}
    (run_,) = httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json=query, timeout=10).json()
    assert link[2] == run_["id"], "the link is to the run that failed"
    page = httpx.get(link[0], headers={"Accept": "text/html"}, timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower(), "the link opens the Prefect UI"


def test_without_a_ui_address_setup_says_how_to_give_one() -> None:
    with pytest.raises(AutomationSetupError, match=r"set PREFECT_API_URL .* or PREFECT_UI_URL, or give --ui-url"):
        ui_address(None)
    with pytest.raises(AutomationSetupError, match="must start with http:// or https://"):
        ui_address("127.0.0.1:4200")
    assert ui_address("https://prefect.example.com/") == "https://prefect.example.com"
