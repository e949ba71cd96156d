"""A flow run's output holds the project's lines, not the libraries' chatter: the optimize stage (the one that
converts with torch.jit and quantizes with NNCF) run as a worker runs a flow, in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from bincount.models import pack_folder, write_untrained_model_dir

ROOT = Path(__file__).resolve().parents[1]

OPTIMIZE_STAGE = """
import json, sys
from prefect import flow
from bincount.config import Settings
from tasks.optimize import optimize_and_publish

@flow(name="optimize-stage")
def optimize_stage(artifact_root: str, model_uri: str, channels: dict[str, str]) -> str:
    return optimize_and_publish(Settings.load(artifact_root=artifact_root), model_uri, channels, "quiet-logs")

print("serves", optimize_stage(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
"""

NOISE = {
    "INFO:nncf": "NNCF's INFO lines",
    "Statistics collection": "NNCF's progress bars",
    "━": "a progress bar",
    "FutureWarning": "torch.jit's deprecation warnings",
    "No CUDA runtime is found": "torch.utils.cpp_extension's warning on import",
}


def test_the_optimize_stage_logs_the_projects_lines_and_no_library_noise(
    server_env: dict[str, str], demo_channels: dict[str, Path], tmp_path: Path
) -> None:
    model = pack_folder(write_untrained_model_dir(tmp_path / "model", "resnet18", 32, seed=4), tmp_path / "model.tgz")
    channels = {name: folder.as_uri() for name, folder in demo_channels.items()}
    done = subprocess.run(
        [sys.executable, "-c", OPTIMIZE_STAGE, str(tmp_path / "artifacts"), model.as_uri(), json.dumps(channels)],
        env=server_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Optimizing " in output and "serves file://" in output, output[-3000:]
    heard = {what: line for line in output.splitlines() for mark, what in NOISE.items() if mark in line}
    assert not heard, f"library noise in the run's output: {heard}"

    logs = httpx.post(f"{server_env['PREFECT_API_URL']}/logs/filter", json={"limit": 200}, timeout=10).json()
    messages = [entry["message"] for entry in logs]
    assert any(m.startswith("Optimizing ") for m in messages), messages
    assert not [m for m in messages for mark in NOISE if mark in m], messages
