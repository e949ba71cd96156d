"""How fast the `bincount` command answers: wall time and peak memory of each quick command, against an
interpreter that does nothing (`python -c pass`) and one that imports the whole pipeline first (what every
command paid before each imported only what it needs).

The commands read a temporary artifact root holding --versions registered versions of one model group and
one recorded endpoint (whose URL does not answer: `health` says so at once). Each command runs --repeat
times in a fresh process; the figures are medians: wall time, CPU time (user + system: what the command
costs, less swayed by other work on a shared machine than wall time) and peak RSS, from the kernel's
accounting of that process
(which counts the launching process's memory too: this script imports only the standard library, and the
artifact root is filled in a process of its own).

    .venv/bin/python benchmarks/cli_latency.py --repeat 5
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BINCOUNT = str(Path(sys.executable).with_name("bincount"))
COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "bincount --help": [BINCOUNT, "--help"],
    "bincount models list": [BINCOUNT, "models", "list"],
    "bincount models show bincount:1": [BINCOUNT, "models", "show", "bincount:1"],
    "bincount endpoints list": [BINCOUNT, "endpoints", "list"],
    "bincount endpoints describe bincount": [BINCOUNT, "endpoints", "describe", "bincount"],
    "import of the whole pipeline (before)": [sys.executable, "-c", "import flows.pipeline, bincount.factory"],
}


def fill_artifact_root(root: str, versions: int) -> None:
    sys.path.insert(0, str(ROOT))
    from bincount.config import Settings
    from bincount.contracts.registry import DatasetRef, ModelMetrics, ModelVersionSpec
    from bincount.contracts.serving import EndpointRecord
    from bincount.endpoints import EndpointRecords
    from bincount.registry import StorageModelRegistry

    settings = Settings.load(artifact_root=root)
    registry = StorageModelRegistry.from_settings(settings)
    for number in range(1, versions + 1):
        registry.register(
            "bincount",
            ModelVersionSpec(
                model_uri=f"{root}/training-jobs/job-{number}/output/model.tar.gz",
                model_sha256=f"{number:064x}",
                metrics=ModelMetrics(0.5, 1.0, 0.9, {str(c): 0.5 for c in range(1, 6)}, images=500),
                dataset=DatasetRef(f"{root}/datasets/abid/split.csv", "ab" * 32, {"train": 400, "test": 50}),
                code_hash="cd" * 32,
                hyperparameters={"lr": 0.01, "batch-size": 32, "epochs": 3, "arch": "resnet18"},
                training_job=f"bincount-final-{number:010d}",
            ),
        )
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    EndpointRecords(settings, registry.storage).write(
        EndpointRecord(
            name="bincount",
            url=f"http://127.0.0.1:{port}",
            model_uri=f"{root}/training-jobs/job-1/output/model.tar.gz",
            version="0123456789ab",
            arch="resnet18",
            image_size=64,
            classes=[1, 2, 3, 4, 5],
            backend="local",
            deployed_at="2026-12-07T12:00:00+00:00",
        )
    )


def measure(command: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one run of ``command``."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}: {process.stderr.read().decode()[-2000:]}")
    process.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command (default: 5)")
    parser.add_argument("--versions", type=int, default=20, help="registered versions to list (default: 20)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as folder:
        root = Path(folder).as_uri()
        filler = multiprocessing.get_context("spawn").Process(target=fill_artifact_root, args=(root, args.versions))
        filler.start()
        filler.join()
        if filler.exitcode != 0:
            raise SystemExit(f"filling the artifact root {root} failed (exit {filler.exitcode})")
        env = {**os.environ, "BINCOUNT_ARTIFACT_ROOT": root, "PYTHONPATH": str(ROOT)}
        results = {}
        for name, command in COMMANDS.items():
            runs = [measure(command, env) for _ in range(args.repeat)]
            results[name] = tuple(statistics.median(run[i] for run in runs) for i in range(3))
    base_wall, base_cpu, base_rss = results["python -c pass (baseline)"]
    print(f"median of {args.repeat} runs each; {args.versions} versions listed; load average {os.getloadavg()[0]:.1f}")
    print(f"{'command':40} {'wall s':>7} {'x base':>7} {'CPU s':>6} {'x base':>7} {'peak RSS MB':>12} {'x base':>7}")
    for name, (wall, cpu, rss) in results.items():
        print(
            f"{name:40} {wall:7.2f} {wall / base_wall:7.1f} {cpu:6.2f} {cpu / base_cpu:7.1f} "
            f"{rss:12.0f} {rss / base_rss:7.1f}"
        )


if __name__ == "__main__":
    main()
