"""prefect.yaml round trip: a Prefect server on loopback, `prefect deploy`, a process worker, a run; then
that run's pages in the Prefect UI, opened in a real browser (Debian's chromium, headless)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from bincount.demo_data import generate_demo_bucket
from bincount.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
CHROMIUM = shutil.which("chromium")


def run(command: list[str], env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def flow_run_states(env: dict[str, str], flow_name: str) -> list[str]:
    query = {"flows": {"name": {"any_": [flow_name]}}}
    runs = httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json=query, timeout=10).json()
    return [flow_run["state_type"] for flow_run in runs]


def decisions(artifact_root: Path, group: str) -> list[dict]:
    folder = artifact_root / "registry" / group / "decisions"
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


TINY_PIPELINE = {  # endpoint and model group: the default, "bincount"
    "training": {
        "recipe": "seeds",
        "arch": "resnet18",
        "image_size": 32,
        "max_jobs": 1,
        "debugger": False,
        "profiler": False,
        "search_space": [
            {"type": "categorical", "name": "lr", "values": [0.01]},
            {"type": "categorical", "name": "batch-size", "values": [32]},
            {"type": "categorical", "name": "epochs", "values": [1]},
        ],
    },
}


def test_deploy_then_the_scheduled_nightly_runs_with_no_parameters(server_env: dict[str, str], tmp_path: Path) -> None:
    """What a user leaves running: the pipeline deployed once, then nightly runs created with no parameters."""
    bucket = (tmp_path / "bucket").as_uri()
    generate_demo_bucket(Storage(), bucket, images=60, seed=2, size=48)
    artifacts = tmp_path / "artifacts"
    env = {**server_env, "BINCOUNT_DATA_DIR": str(tmp_path / "raw"), "BINCOUNT_ARTIFACT_ROOT": str(artifacts)}

    run([sys.executable, "-m", "deployments.setup"], env)
    deployed = run([PREFECT, "--no-prompt", "deploy", "--all"], env)
    expected = [
        "bincount-pipeline/on-demand",
        "bincount-pipeline/demo",
        "nightly-retrain/nightly",
        "batch-transform/on-demand",
        "prepare-data/on-demand",
        "rollback-model/on-demand",
    ]
    assert all(name in deployed for name in expected), deployed
    nightly = run([PREFECT, "deployment", "inspect", "nightly-retrain/nightly"], env)
    assert "0 2 * * *" in nightly and "Europe/Berlin" in nightly
    described = httpx.get(f"{env['PREFECT_API_URL']}/deployments/name/nightly-retrain/nightly", timeout=10).json()
    limit = described.get("global_concurrency_limit") or {}
    assert limit.get("limit") == 1, f"one nightly at a time: {described}"
    assert (described.get("concurrency_options") or {}).get("collision_strategy") == "ENQUEUE", "a second one waits"
    assert "SCHEDULED" in flow_run_states(env, "nightly-retrain"), "the scheduler creates the nightly runs"

    training, location = json.dumps(TINY_PIPELINE["training"]), json.dumps({"source_uri": bucket})
    run(
        [
            PREFECT,
            "deployment",
            "run",
            "bincount-pipeline/on-demand",
            "--param",
            f"training={training}",
            "--param",
            f"location={location}",
        ],
        env,
    )  # as the README's examples give them
    try:
        run([PREFECT, "worker", "start", "--pool", "bincount-local", "--run-once"], env, timeout=600)
        assert flow_run_states(env, "bincount-pipeline") == ["COMPLETED"]

        for _ in range(2):  # as the schedule creates them: no parameters at all
            run([PREFECT, "deployment", "run", "nightly-retrain/nightly"], env)
            run([PREFECT, "worker", "start", "--pool", "bincount-local", "--run-once"], env, timeout=600)
            if len(decisions(artifacts, "bincount")) == 1:
                generate_demo_bucket(Storage(), bucket, images=90, seed=2, size=48)  # new photos arrive
        assert flow_run_states(env, "nightly-retrain").count("COMPLETED") == 2
        unchanged, retrained = decisions(artifacts, "bincount")
        assert "nothing retrained" in unchanged["reason"] and unchanged["challenger_version"] is None
        assert retrained["challenger_version"] == 2 and retrained["serving_version"] == 1
        version = json.loads((artifacts / "registry" / "bincount" / "versions" / "000002.json").read_text())
        assert version["spec"]["recipe"]["location"]["source_uri"] == bucket, "the production version's data source"
        assert version["spec"]["hyperparameters"]["epochs"] == 1, "and its recipe"

        scored = tmp_path / "scored"
        run(
            [
                PREFECT,
                "deployment",
                "run",
                "batch-transform/on-demand",
                "--param",
                f"input_uri={artifacts / 'datasets' / 'abid' / 'channels' / 'test'}",
                "--param",
                f"output_uri={scored}",
            ],
            env,
        )
        run([PREFECT, "worker", "start", "--pool", "bincount-local", "--run-once"], env, timeout=600)
        assert flow_run_states(env, "batch-transform") == ["COMPLETED"] * 2, "the pipeline's and this one"
        assert (scored / "results.csv").is_file()
        for flow_name, figure in (("nightly-retrain", "| decision |"), ("batch-transform", "| scored |")):
            assert figure in latest_artifact(env, f"summary-{flow_name}")["data"], f"{flow_name}'s run summary"
    finally:
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "delete-endpoint", "bincount"], env=env, cwd=ROOT, timeout=120
        )


def latest_artifact(env: dict[str, str], key: str) -> dict:
    query = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    found = httpx.post(f"{env['PREFECT_API_URL']}/artifacts/filter", json=query, timeout=10).json()
    if not found:
        pytest.skip(
            f"no artifact {key!r}: this test reads the runs of "
            "test_deploy_then_the_scheduled_nightly_runs_with_no_parameters"
        )
    return found[0]


def rendered(url: str, expression: str, timeout_s: float = 120) -> dict:
    """Open ``url`` in headless Chromium (DESIGN.md's flags) and evaluate the JavaScript ``expression``
    over the DevTools protocol until it returns a non-empty JSON string; return that, parsed."""
    assert CHROMIUM is not None
    # Chromium's helpers (crashpad, zygote) can still write to the profile after the browser exits:
    # the whole process group is stopped, and a file they leave behind is not a failure.
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                f"--user-data-dir={profile}",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
                url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout_s
            port_file = Path(profile) / "DevToolsActivePort"
            while not (port_file.is_file() and port_file.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            (page,) = [
                t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"
            ]
            with connect(page["webSocketDebuggerUrl"], max_size=None) as devtools:
                for number in range(1, 10_000):
                    devtools.send(
                        json.dumps(
                            {
                                "id": number,
                                "method": "Runtime.evaluate",
                                "params": {"expression": expression, "returnByValue": True},
                            }
                        )
                    )
                    reply = json.loads(devtools.recv())
                    while reply.get("id") != number:  # no events are enabled: only answers come
                        reply = json.loads(devtools.recv())
                    value = reply.get("result", {}).get("result", {}).get("value")
                    if value or time.monotonic() > deadline:
                        break
                    time.sleep(1)
        finally:
            os.killpg(browser.pid, signal.SIGTERM)
            try:
                browser.wait(timeout=30)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(browser.pid, signal.SIGKILL)
    assert value, f"{url} did not show what was expected within {timeout_s} s"
    return json.loads(value)


PAGE = """(() => {{
  const text = document.body ? document.body.innerText : "";
  const plots = [...document.images].filter(image => image.src.startsWith("data:image/png"));
  const ready = text.includes({mark!r}) && plots.length >= {plots} && plots.every(image => image.complete);
  return ready ? JSON.stringify({{text, widths: plots.map(image => image.naturalWidth)}}) : "";
}})()"""


def test_the_pipeline_run_reads_in_a_real_browser(server_env: dict[str, str]) -> None:
    """The summary and a plot of the deployed pipeline's run, as a user sees them in the Prefect UI."""
    if CHROMIUM is None:
        pytest.skip(
            "Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it where apt works)"
        )
    ui = server_env["PREFECT_API_URL"].removesuffix("/api")
    summary = latest_artifact(server_env, "summary-bincount-pipeline")
    page = rendered(f"{ui}/artifacts/artifact/{summary['id']}", PAGE.format(mark="test accuracy", plots=0))
    for figure in ("bincount:1", "test RMSE", "http://127.0.0.1:", "prepare-data", "training-curves", "Completed"):
        assert figure in page["text"], (figure, page["text"][:3000])

    plot = latest_artifact(server_env, "training-curves")
    page = rendered(f"{ui}/artifacts/artifact/{plot['id']}", PAGE.format(mark="Training curves", plots=1))
    assert page["widths"] and all(width > 0 for width in page["widths"]), page["widths"]

    stopped = latest_artifact(server_env, "endpoint-bincount")
    assert "`bincount`: stopped" in stopped["data"], "bincount delete-endpoint left the endpoint's artifact saying so"
