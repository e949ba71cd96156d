"""Cold start of an endpoint scaled to zero, against a warm request to the same endpoint, side by side.

A local endpoint with ``min_replicas`` 0 serves an untrained model of the default recipe's network
(EfficientNet-Lite1 at 192 px). Each round waits until the router has stopped the idle host, then
times one request from a client that sends it until its answer arrives (the cold start: the router
starts a host, the host imports torch and loads the model, then answers), then times ``--warm``
requests to the host that request started (the baseline), and a new Python process that imports
the host's module and loads the same model (the floor of any cold start: what the router cannot save).
Rounds alternate the three, so the machine's drifting load weighs on all. Requests use raw HTTP.

    .venv/bin/python benchmarks/cold_start.py --rounds 5
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from bincount.config import Settings
from bincount.contracts.serving import ScalingConfig
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend
from bincount.models import write_untrained_model_dir

NAME = "cold-start"
ROOT = Path(__file__).resolve().parents[1]
LOAD = "import sys; import bincount.local.host; from sm_scripts import inference; inference.model_fn(sys.argv[1])"


def timed_request(url: str, body: bytes, timeout_s: float) -> float:
    """Seconds from sending one invocation on a fresh connection to its whole answer; fails on a non-200."""
    target = urlparse(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout_s)
    try:
        start = time.perf_counter()
        connection.request("POST", f"/endpoints/{NAME}/invocations", body, {"Content-Type": "image/jpeg"})
        answer = connection.getresponse()
        data = answer.read()
        seconds = time.perf_counter() - start
    finally:
        connection.close()
    if answer.status != 200:
        raise RuntimeError(f"the endpoint answered {answer.status}: {data[:300]!r}")
    return seconds


def process_and_load(model_dir: Path) -> float:
    """Seconds for a new process to import the host's module and load the model, then exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOAD, str(model_dir)], check=True, cwd=ROOT)
    return time.perf_counter() - start


def wait_for_zero(backend: LocalServingBackend, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = backend._router_status(url, NAME)
        current = status.current_variant if status is not None else None
        if status is not None and status.scaled_to_zero and current is not None and not current.replicas:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the endpoint did not scale to zero within {timeout_s:.0f} s")
        time.sleep(0.1)


def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="cold-start-"))
    model = write_untrained_model_dir(root / "model", args.arch, args.image_size, seed=0)
    photo = jpeg_bytes(render_bin_image(3, np.random.default_rng(0), size=args.image_size))
    backend = LocalServingBackend(
        Settings.load(artifact_root=str(root / "artifacts")), host_options=HostOptions(threads=args.threads)
    )
    scaling = ScalingConfig(
        min_replicas=0, scale_in_idle_seconds=args.idle_seconds, cold_start_timeout_s=args.timeout_seconds
    )
    record = backend.deploy(NAME, model.as_uri(), scaling=scaling)
    colds: list[float] = []
    warms: list[float] = []
    floors: list[float] = []
    try:
        for round_ in range(args.rounds):
            wait_for_zero(backend, record.url, args.idle_seconds + 60)
            cold = timed_request(record.url, photo, args.timeout_seconds + 10)
            warm = [timed_request(record.url, photo, 60) for _ in range(args.warm)]
            floors.append(process_and_load(model))
            colds.append(cold)
            warms.append(statistics.median(warm))
            print(
                f"round {round_ + 1}: cold {cold:.2f} s, warm median {1000 * warms[-1]:.0f} ms, "
                f"a process importing and loading the model {floors[-1]:.2f} s",
                flush=True,
            )
    finally:
        backend.delete(NAME)
    cold, warm, floor = statistics.median(colds), statistics.median(warms), statistics.median(floors)
    print(
        f"{args.arch} at {args.image_size} px, {args.rounds} rounds (medians): cold start {cold:.2f} s "
        f"(min {min(colds):.2f}, max {max(colds):.2f}); warm request {1000 * warm:.0f} ms (cold / warm "
        f"{cold / warm:.0f}x); a process importing and loading the model {floor:.2f} s (cold - floor - warm: "
        f"{cold - floor - warm:+.2f} s)"
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Cold start of a local endpoint scaled to zero, against warm.")
    parser.add_argument("--arch", default="efficientnet_lite1", help="network (default: efficientnet_lite1)")
    parser.add_argument("--image-size", type=int, default=192, help="model input size (default: 192)")
    parser.add_argument("--rounds", type=int, default=5, help="cold starts measured (default: 5)")
    parser.add_argument("--warm", type=int, default=5, help="warm requests after each cold one (default: 5)")
    parser.add_argument(
        "--idle-seconds", type=float, default=2.0, help="scale_in_idle_seconds of the endpoint (default: 2)"
    )
    parser.add_argument(
        "--timeout-seconds", type=float, default=120.0, help="cold_start_timeout_s of the endpoint (default: 120)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per host (default: cores available)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
