"""Endpoint throughput and latency against the bare model's forward, measured in the same run.

A local endpoint (router + model host, as deployed) serves an untrained model of the real
architecture; closed-loop clients (1, 8, 32 by default) each send a real ABID photo, wait for the
answer and send again, with micro-batching on and off. The baseline is the same model's forward
on preprocessed pixels in this process, at each batch size, before and after the endpoint runs
(both are printed: the spread is the machine's noise). Clients use raw keep-alive HTTP, so that
their own cost stays small beside the server's on a machine with few cores.

    .venv/bin/python benchmarks/serve_endpoint.py --arch resnet50 --image-size 224 --seconds 20
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from bincount.config import Settings
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.local.batcher import available_cores, prepare_model_thread
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend
from bincount.models import write_untrained_model_dir
from sm_scripts import inference

ROOT = Path(__file__).resolve().parents[1]
ABID_PHOTO = ROOT.parent / "shared" / "data" / "abid" / "bucket" / "bin-images" / "01000.jpg"
NAME = "bench"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BareForward:
    """The model's forward alone, on pixels decoded once, on a thread set up like the host's model thread."""

    def __init__(self, model_dir: Path, photo: bytes, threads: int) -> None:
        self._thread = ThreadPoolExecutor(1, initializer=prepare_model_thread, initargs=(threads,))
        self.model = self._thread.submit(inference.model_fn, str(model_dir)).result()
        self.pixels = inference.preprocess(inference.input_fn(photo, "image/jpeg"), self.model)

    def measure(self, batch_size: int, seconds: float) -> tuple[float, float]:
        """(images/s, CPU ms per image) over ``seconds``; the process does nothing else meanwhile."""
        return self._thread.submit(self._measure, batch_size, seconds).result()

    def _measure(self, batch_size: int, seconds: float) -> tuple[float, float]:
        batch = self.pixels.repeat(batch_size, 1, 1, 1)
        inference.forward(batch, self.model)  # warm up this shape
        done, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            inference.forward(batch, self.model)
            done += batch_size
        return done / (time.perf_counter() - start), 1000 * (time.process_time() - cpu_start) / done

    def close(self) -> None:
        self._thread.shutdown()


def load(
    url: str, photo: bytes, clients: int, seconds: float, name: str = NAME, path: str | None = None
) -> dict[str, float]:
    """Closed-loop clients for ``seconds``; req/s, p50/p99 latency (ms) and errors.

    They POST to ``path`` (default: endpoint ``name``'s invocations) on ``url``'s host.
    """
    target = urlparse(url)
    path = path or f"/endpoints/{name}/invocations"
    headers = {"Content-Type": "image/jpeg", "Accept": "application/json"}
    latencies: list[float] = []
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        while not stop.is_set():
            start = time.perf_counter()
            try:
                connection.request("POST", path, body=photo, headers=headers)
                response = connection.getresponse()
                body = response.read()
                ok = response.status == 200 and b"predicted_count" in body
            except (OSError, http.client.HTTPException) as error:
                ok, body = False, repr(error).encode()
                connection.close()
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            with lock:
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors.append(body[:200].decode(errors="replace"))
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "req_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(ordered) if ordered else float("nan"),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan"),
        "errors": len(errors),
    }


def main(args: argparse.Namespace) -> None:
    threads = args.threads or available_cores()
    photo = (
        ABID_PHOTO.read_bytes() if ABID_PHOTO.is_file() else jpeg_bytes(render_bin_image(3, np.random.default_rng(0)))
    )
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = write_untrained_model_dir(Path(scratch) / "model", args.arch, args.image_size)
        print(
            f"{args.arch} at {args.image_size} px, {threads} torch threads, {available_cores()} cores; "
            f"photo {len(photo)} bytes; load average {os.getloadavg()[0]:.1f}"
        )
        bare = BareForward(model_dir, photo, threads)
        sweep = {
            size: bare.measure(size, args.bare_seconds) for size in sorted({1, *args.batch_sizes, args.max_batch_size})
        }
        print(
            "bare forward: "
            + ", ".join(f"batch {b}: {r:.1f} images/s ({c:.0f} CPU ms/image)" for b, (r, c) in sweep.items()),
            flush=True,
        )

        backend = LocalServingBackend(Settings.load(artifact_root=str(Path(scratch) / "artifacts")))
        rows = []
        for label, batch in (("micro-batching", args.max_batch_size), ("no batching", 1)):
            backend.host_options = HostOptions(max_batch_size=batch, max_wait_ms=args.max_wait_ms, threads=threads)
            record = backend.deploy(NAME, model_dir.as_uri())
            url = record.details["host_url"] if args.direct else record.url
            load(url, photo, 2, 3.0)  # warm up the host
            processes = {"host": record.details["host_pid"], "router": record.details["router_pid"]}
            for clients in args.clients:
                # the bare forward right before and after each level: the machine's load drifts
                bare_before, bare_cpu = bare.measure(args.max_batch_size, args.bare_seconds)
                cpu_before = {role: cpu_seconds(pid) for role, pid in processes.items()}
                result = load(url, photo, clients, args.seconds)
                served = max(result["req_s"] * args.seconds, 1)
                cpu = {role: 1000 * (cpu_seconds(pid) - cpu_before[role]) / served for role, pid in processes.items()}
                bare_after, _ = bare.measure(args.max_batch_size, args.bare_seconds)
                adjacent = (bare_before + bare_after) / 2
                rows.append((label, clients, result, adjacent, cpu["host"] + cpu["router"], bare_cpu))
                print(
                    f"{label:>15} {clients:>3} clients: {result['req_s']:5.1f} req/s = "
                    f"{result['req_s'] / adjacent:6.1%} of bare "
                    f"batch {args.max_batch_size} ({bare_before:.1f} before, {bare_after:.1f} after)  "
                    f"p50 {result['p50_ms']:6.0f} ms  p99 {result['p99_ms']:6.0f} ms  errors {result['errors']}  "
                    f"CPU ms/request: host {cpu['host']:.0f} + router {cpu['router']:.1f} (bare {bare_cpu:.0f})",
                    flush=True,
                )
        backend.delete(NAME)
        bare.close()
    print(f"load average {os.getloadavg()[0]:.1f} (other processes on these cores skew every figure)")
    print(
        "\nsummary: throughput vs adjacent bare forward | CPU efficiency (bare CPU per image / endpoint CPU per "
        "request)"
    )
    for label, clients, result, adjacent, endpoint_cpu, bare_cpu in rows:
        print(
            f"  {label:>15} {clients:>3} clients: {result['req_s'] / adjacent:6.1%} | {bare_cpu / endpoint_cpu:6.1%} | "
            f"p99 {result['p99_ms']:.0f} ms | errors {result['errors']}"
        )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Local endpoint req/s and latency vs the bare model forward.")
    parser.add_argument("--arch", default="resnet50", help="resnet18, resnet34 or resnet50 (default: resnet50)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (default: 224)")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients (default: 1 8 32)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per load level (default: 20)")
    parser.add_argument("--bare-seconds", type=float, default=8.0, help="seconds per bare batch size (default: 8)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[4, 8, 16], help="bare batch sizes (default: 4 8 16)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=HostOptions.max_batch_size, help="host batch bound (default: 8)"
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=HostOptions.max_wait_ms, help="host batch wait (default: 5)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores available)")
    parser.add_argument("--direct", action="store_true", help="load the model host directly, skipping the router")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
