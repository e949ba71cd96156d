"""prefect.yaml round trip: a Prefect server on loopback, `prefect deploy` (also in a terminal, where it must ask
nothing), a process worker, a run; then that run's pages in the Prefect UI, opened in a real browser (Debian's
chromium, headless)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import httpx
import pytest
from conftest import PREFECT
from waiting import wait_until
from websockets.sync.client import connect

from bincount.demo_data import generate_demo_bucket
from bincount.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")


def run(command: list[str], env: dict[str, str], timeout: float = 300) -> str:
    """Run ``command`` in the project root, as from a shell there (``$PWD``, which prefect.yaml's pull step reads)."""
    env = {**env, "PWD": str(ROOT)}
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


def run_in_terminal(command: list[str], env: dict[str, str], timeout_s: float = 300) -> str:
    """Run ``command`` in the project root with a pseudo-terminal as its stdin, stdout and stderr, as a person
    types it, and answer nothing: return what it wrote once it exits 0. A command still running at the deadline
    (waiting for an answer) is killed, and the test fails with what it wrote."""
    primary, secondary = pty.openpty()
    termios.tcsetwinsize(primary, (50, 200))  # rows, columns: wide enough that no name wraps
    env = {**env, "PWD": str(ROOT), "TERM": "xterm-256color"}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=secondary, stdout=secondary, stderr=secondary, start_new_session=True
    )
    os.close(secondary)
    written = bytearray()

    def exited() -> bool:
        while select.select([primary], [], [], 0.2)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other side is closed (the command and its children exited)
                break
            if not chunk:
                break
            written.extend(chunk)
        return process.poll() is not None

    try:
        wait_until(exited, timeout_s=timeout_s, interval_s=0, what=f"{' '.join(command)} to exit")
        exited()  # what it wrote last
    except AssertionError:
        tail = written.decode(errors="replace")[-3000:]
        raise AssertionError(f"{' '.join(command)} did not exit within {timeout_s:.0f} s; it wrote:\n{tail}") from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        os.close(primary)
    text = written.decode(errors="replace")
    assert process.returncode == 0, f"{' '.join(command)} exited {process.returncode}:\n{text[-3000:]}"
    return text


PROMPTS = re.compile(r"\[y/n\]|Would you like|\? .*:\s*$", re.MULTILINE)
"""What Prefect's questions look like: a confirm's ``[y/n]``, "Would you like ...", or a ``? ...:`` prompt."""


def deployment_names(env: dict[str, str]) -> set[str]:
    deployments = httpx.post(f"{env['PREFECT_API_URL']}/deployments/filter", json={}, timeout=10).json()
    flows = httpx.post(f"{env['PREFECT_API_URL']}/flows/filter", json={}, timeout=10).json()
    flow_names = {flow["id"]: flow["name"] for flow in flows}
    return {f"{flow_names[d['flow_id']]}/{d['name']}" for d in deployments}


def test_deploy_all_asks_nothing_in_a_terminal(server_env: dict[str, str]) -> None:
    """The README's `prefect deploy --all`, typed in a terminal: every deployment created, no question asked."""
    run([sys.executable, "-m", "deployments.setup"], server_env)
    output = run_in_terminal([PREFECT, "deploy", "--all"], server_env)
    assert "\x1b[" in output, "Prefect saw a terminal (its output is coloured), so it would have asked"
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)
    assert not PROMPTS.search(plain), plain[-3000:]
    expected = {
        "bincount-pipeline/on-demand",
        "bincount-pipeline/demo",
        "nightly-retrain/nightly",
        "rollback-model/on-demand",
        "batch-transform/on-demand",
        "prepare-data/on-demand",
        "monitor-endpoint/hourly",
    }
    assert expected <= deployment_names(server_env), plain[-3000:]
    nightly = httpx.get(f"{server_env['PREFECT_API_URL']}/deployments/name/nightly-retrain/nightly", timeout=10).json()
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}], (
        "the worker runs the code in this folder"
    )


def test_aws_deploy_all_asks_nothing_in_a_terminal(server_env: dict[str, str]) -> None:
    """docs/AWS.md's `prefect deploy --all --prefect-file deployments/aws.prefect.yaml`, typed in a terminal."""
    env = {
        **server_env,
        "BINCOUNT_IMAGE": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/bincount:test",
        "BINCOUNT_ARTIFACT_ROOT": "s3://bincount-test/bincount",
        "BINCOUNT_SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/bincount-sagemaker",
        "BINCOUNT_AWS_REGION": "eu-west-1",
    }
    run([sys.executable, "-m", "deployments.setup", "--aws", "--bucket", "bincount-test"], env)
    output = run_in_terminal([PREFECT, "deploy", "--all", "--prefect-file", "deployments/aws.prefect.yaml"], env)
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)
    assert "\x1b[" in output and not PROMPTS.search(plain), plain[-3000:]
    assert {"bincount-pipeline/aws", "nightly-retrain/aws-nightly", "batch-transform/aws"} <= deployment_names(env)


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
    )  # as the examples of docs/OPERATIONS.md give them
    try:
        run([PREFECT, "worker", "start", "--pool", "bincount-local", "--run-once"], env, timeout=600)
        assert flow_run_states(env, "bincount-pipeline") == ["COMPLETED"]

        for _ in range(2):  # as the schedule creates them: no parameters at all
            run([PREFECT, "deployment", "run", "nightly-retrain/nightly"], env)
            run([PREFECT, "worker", "start", "--pool", "bincount-local", "--run-once"], env, timeout=600)
            if len(decisions(artifacts, "bincount")) == 2:  # the pipeline's, then the first nightly's
                generate_demo_bucket(Storage(), bucket, images=90, seed=2, size=48)  # new photos arrive
        assert flow_run_states(env, "nightly-retrain").count("COMPLETED") == 2
        first, unchanged, retrained = decisions(artifacts, "bincount")
        assert first["promoted"] and "no model serves this endpoint yet" in first["reason"], "the pipeline's"
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
    """Open ``url`` in headless Chromium (the flags below) and evaluate the JavaScript ``expression``
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
            wait_until(
                lambda: port_file.is_file() and port_file.read_text().strip(),
                timeout_s=timeout_s,
                interval_s=0.2,
                what="chromium to write its DevTools port",
            )
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
