"""prefect.yaml round trip: a Prefect server on loopback, `prefect deploy`, a process worker, a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from bincount.demo_data import generate_demo_bucket
from bincount.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


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

    pipeline = {**TINY_PIPELINE, "location": {"source_uri": bucket}}
    run([PREFECT, "deployment", "run", "bincount-pipeline/on-demand", "--params", json.dumps(pipeline)], env)
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
    finally:
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "delete-endpoint", "bincount"], env=env, cwd=ROOT, timeout=120
        )
