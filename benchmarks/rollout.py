"""The router's cost, replicas against one, and a canary bake under load, measured in one run.

Two local endpoints serve the same untrained model: one with one replica, one with two
(``ScalingConfig(min_replicas=2, max_replicas=2)``). In alternating rounds (so the machine's drifting
load hits both alike), closed-loop clients load:

1. router overhead: the one-replica endpoint against its model host directly, at 1 and 8 clients;
2. replicas: the two-replica endpoint against the one-replica one, at 8 and 32 clients.

Then, with 8 clients loading the one-replica endpoint, a second model is deployed to it as a canary
(20% for ``--bake`` seconds, then all): the failed requests over the whole bake are counted.
Prints every round and the ratios of the medians.

    .venv/bin/python benchmarks/rollout.py --seconds 8 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from pathlib import Path

import numpy as np
from serve_endpoint import ABID_PHOTO, load

from bincount.config import Settings
from bincount.contracts.serving import RolloutStrategy, ScalingConfig
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend
from bincount.models import write_untrained_model_dir


def compare(
    label: str, runs: dict[str, tuple[str, str]], clients: int, seconds: float, rounds: int, photo: bytes
) -> dict[str, list[dict[str, float]]]:
    """Alternating rounds over ``runs`` (label -> (url, endpoint name)); each round's figures printed."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for round_number in range(rounds):
        for name, (url, endpoint) in runs.items():
            figures = load(url, photo, clients, seconds, endpoint)
            results[name].append(figures)
            print(
                f"{label} {clients:>2} clients round {round_number + 1} {name:<12} {figures['req_s']:7.1f} req/s "
                f"p50 {figures['p50_ms']:6.1f} ms p99 {figures['p99_ms']:6.1f} ms errors {figures['errors']:.0f}",
                flush=True,
            )
    return results


def median(results: list[dict[str, float]], key: str) -> float:
    return statistics.median(figures[key] for figures in results)


def main(args: argparse.Namespace) -> None:
    photo = (
        ABID_PHOTO.read_bytes() if ABID_PHOTO.is_file() else jpeg_bytes(render_bin_image(3, np.random.default_rng(0)))
    )
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings.load(artifact_root=str(Path(scratch) / "artifacts"))
        first = write_untrained_model_dir(Path(scratch) / "first", args.arch, args.image_size, seed=1)
        second = write_untrained_model_dir(Path(scratch) / "second", args.arch, args.image_size, seed=2)
        backend = LocalServingBackend(settings, host_options=HostOptions(threads=args.threads))
        one = backend.deploy("one-replica", first.as_uri())
        two = backend.deploy("two-replicas", first.as_uri(), scaling=ScalingConfig(min_replicas=2, max_replicas=2))
        try:
            summary = []
            for clients in (1, 8):
                runs = {"host direct": (one.details["host_url"], one.name), "endpoint": (one.url, one.name)}
                results = compare("overhead", runs, clients, args.seconds, args.rounds, photo)
                direct, routed = results["host direct"], results["endpoint"]
                added = median(routed, "p50_ms") - median(direct, "p50_ms")
                summary.append(
                    f"router overhead, {clients} clients: p50 {added:+.2f} ms per request, "
                    f"req/s endpoint/direct {median(routed, 'req_s') / median(direct, 'req_s'):.3f}"
                )
            for clients in (8, 32):
                runs = {"1 replica": (one.url, one.name), "2 replicas": (two.url, two.name)}
                results = compare("replicas", runs, clients, args.seconds, args.rounds, photo)
                single, double = results["1 replica"], results["2 replicas"]
                throughput = median(double, "req_s") / median(single, "req_s")
                summary.append(
                    f"2 replicas / 1, {clients} clients: req/s {throughput:.3f}, "
                    f"p99 {median(double, 'p99_ms') / median(single, 'p99_ms'):.3f}"
                )

            canary: dict[str, float] = {}
            loader = threading.Thread(
                target=lambda: canary.update(load(one.url, photo, 8, args.bake + 25, one.name)), daemon=True
            )
            loader.start()
            strategy = RolloutStrategy(
                kind="canary", traffic_percent=20, bake_seconds=args.bake, min_requests=20, max_latency_ratio=3.0
            )
            record = backend.deploy(one.name, second.as_uri(), strategy=strategy)
            loader.join()
            rollout = record.rollout
            assert rollout is not None
            summary.append(
                f"canary 20% for {args.bake:.0f} s under 8 clients: {rollout.verdict} ({rollout.reason}); "
                f"{canary['req_s']:.1f} req/s over the whole run, {canary['errors']:.0f} failed requests"
            )
            print("\n" + "\n".join(summary))
        finally:
            backend.delete(one.name)
            backend.delete(two.name)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Router overhead, replicas, and a canary bake under load.")
    parser.add_argument("--arch", default="resnet18", help="resnet18, resnet34 or resnet50 (default: resnet18)")
    parser.add_argument("--image-size", type=int, default=64, help="model input size (default: 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica (default: 1)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per load round (default: 8)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison (default: 3)")
    parser.add_argument("--bake", type=float, default=10.0, help="canary bake seconds (default: 10)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
