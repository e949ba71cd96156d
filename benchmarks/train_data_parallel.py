"""Data-parallel speed-up: train.py as N processes under torchrun against one process, side by side.

Same channels, flags, seed and global batch; the host's cores are shared the same way (one process
gets all ``--threads``, N processes get ``threads / N`` each). Runs alternate (``--repeats`` of each)
and the figure is each side's median training images/s (train.py's ``train_ips``, over every process
in a data-parallel run) and wall time, as a ratio. Photos: real ABID photos when the sample is at
``../shared/data/abid``, else synthetic ones.

    .venv/bin/python benchmarks/train_data_parallel.py                              # 2 processes, CPU (gloo)
    .venv/bin/python benchmarks/train_data_parallel.py --processes 8 --arch resnet50 --image-size 224 \\
        --images 8192 --batch-size 512                                              # 8 GPUs (NCCL)

On a CPU, processes only pay off when each has cores of its own that one process's intra-op threads
leave idle; on the shared 2-core machine this project is developed on the figure is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_throughput import image_folder

SM_SCRIPTS = ROOT / "sm_scripts"


def run(processes: int, channel: Path, job_dir: Path, flags: list[str], threads: int) -> tuple[float, float]:
    """One train.py run; returns (median training images/s over its epochs, wall seconds)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {
        **os.environ,
        "SM_CHANNEL_TRAIN": str(channel),
        "SM_CHANNEL_VALID": str(channel),
        "SM_MODEL_DIR": str(job_dir / "model"),
        "SM_OUTPUT_DIR": str(job_dir / "output"),
        "SM_OUTPUT_DATA_DIR": str(job_dir / "output" / "data"),
        "SM_NUM_CPUS": str(threads),
    }
    start = time.perf_counter()
    subprocess.run([*launcher, "train.py", *flags], cwd=SM_SCRIPTS, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    history = json.loads((job_dir / "output" / "data" / "history.json").read_text())
    return statistics.median(row["train_ips"] for row in history), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="data-parallel processes (default: 2)")
    parser.add_argument("--arch", default="resnet18", help="(default: resnet18)")
    parser.add_argument("--image-size", type=int, default=112, help="(default: 112)")
    parser.add_argument("--images", type=int, default=256, help="training images (default: 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch (default: 32)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs a run (default: 2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating (default: 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the host's threads (default: all)")
    args = parser.parse_args()
    flags = [
        *("--arch", args.arch, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size)),
        *("--epochs", str(args.epochs), "--log-interval", "0", "--eval-batch-size", "64"),
    ]
    results: dict[int, list[tuple[float, float]]] = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory(prefix="data-parallel-") as scratch:
        channel = image_folder(Path(scratch), args.images)
        for repeat in range(args.repeats):
            for processes in results:
                ips, wall = run(processes, channel, Path(scratch) / f"{processes}-{repeat}", flags, args.threads)
                results[processes].append((ips, wall))
                print(f"{processes} process(es): {ips:.1f} images/s, {wall:.1f} s wall", flush=True)
    one, many = results[1], results[args.processes]
    ips_ratio = statistics.median(r[0] for r in many) / statistics.median(r[0] for r in one)
    wall_ratio = statistics.median(r[1] for r in one) / statistics.median(r[1] for r in many)
    print(
        f"\n{args.processes} processes against 1 ({args.arch}, {args.image_size} px, {args.images} images, batch "
        f"{args.batch_size}, {args.threads} threads in all): training images/s {ips_ratio:.2f}x, wall time "
        f"{wall_ratio:.2f}x faster"
    )
    print("command: .venv/bin/python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
