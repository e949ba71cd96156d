"""Endpoint throughput and p99 with data capture at 100% against capture off, in one run.

Two local endpoints (router + model host, as deployed) serve the same untrained model, one capturing
every request (real ABID photo inline, base64) and one not; closed-loop clients load them in turns
(off, on, off, on, ...) so the machine's drifting load hits both alike. Prints each round and the
ratios of the medians (target: throughput >= 95%, p99 within 10%).

    .venv/bin/python benchmarks/capture_overhead.py --clients 8 --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
from serve_endpoint import ABID_PHOTO, load

from bincount.capture import capture_prefix, read_capture
from bincount.config import Settings
from bincount.contracts.serving import CaptureConfig
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend
from bincount.models import write_untrained_model_dir
from bincount.storage import Storage


def main(args: argparse.Namespace) -> None:
    photo = (
        ABID_PHOTO.read_bytes() if ABID_PHOTO.is_file() else jpeg_bytes(render_bin_image(3, np.random.default_rng(0)))
    )
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings.load(artifact_root=str(Path(scratch) / "artifacts"))
        model_dir = write_untrained_model_dir(Path(scratch) / "model", args.arch, args.image_size)
        backend = LocalServingBackend(settings, host_options=HostOptions(threads=args.threads))
        endpoints = {
            "off": backend.deploy("bench-off", model_dir.as_uri()),
            "on": backend.deploy("bench-on", model_dir.as_uri(), capture=CaptureConfig(sampling_percentage=100)),
        }
        print(
            f"{args.arch} at {args.image_size} px, photo {len(photo)} bytes, {args.clients} clients, load "
            f"{os.getloadavg()[0]:.1f}"
        )
        for record in endpoints.values():
            load(record.url, photo, 2, 2.0, record.name)  # warm up
        results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for round_number in range(args.rounds):
            for label in ("off", "on") if round_number % 2 == 0 else ("on", "off"):
                record = endpoints[label]
                result = load(record.url, photo, args.clients, args.seconds, record.name)
                results[label].append(result)
                print(
                    f"round {round_number + 1} capture {label:>3}: {result['req_s']:6.1f} req/s  p50 "
                    f"{result['p50_ms']:6.0f} ms  "
                    f"p99 {result['p99_ms']:6.0f} ms  errors {result['errors']}",
                    flush=True,
                )
        status = backend._router_status(endpoints["on"].url, "bench-on")
        stats = status.capture if status is not None else None
        for record in endpoints.values():
            backend.delete(record.name)
        captured = read_capture(Storage(), capture_prefix(settings.artifact_root, "bench-on"))
    median = {
        label: {key: statistics.median(r[key] for r in rows) for key in ("req_s", "p99_ms")}
        for label, rows in results.items()
    }
    throughput = median["on"]["req_s"] / median["off"]["req_s"]
    p99 = median["on"]["p99_ms"] / median["off"]["p99_ms"]
    print(f"capture writer: {stats}; records on disk {len(captured.records)}, problems {len(captured.problems)}")
    print(
        f"summary: capture 100% vs off, medians of {args.rounds} rounds: throughput {throughput:.1%} (target >= 95%), "
        f"p99 {p99:.1%} of off (target <= 110%)"
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Endpoint req/s and p99 with capture at 100% vs off.")
    parser.add_argument("--arch", default="resnet18", help="resnet18, resnet34 or resnet50 (default: resnet18)")
    parser.add_argument("--image-size", type=int, default=112, help="model input size (default: 112)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per round and endpoint (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per host (default: cores available)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
