"""TorchServe 0.12 against the project's eager and int8 local endpoints: same weights, same photo, one run.

1. An untrained ResNet-50 at 224 px (batch-norm statistics set, as ``write_untrained_model_dir``
   does; or ``--model-uri``) goes through the optimize stage (OpenVINO int8, calibrated on the real
   sample's training side, parity-checked on its test side), as in ``optimized_model.py``.
2. The same ``model.pt`` is archived for TorchServe with ``benchmarks/torchserve_handler.py``,
   which decodes, resizes, normalizes and batches with ``sm_scripts.inference``: the tensors and
   the work are the local endpoint's; the frontend, queue, batching and worker are TorchServe's.
3. TorchServe's configurations (workers, batch size, max batch delay; ``--configs``) are each
   loaded by 8 closed-loop clients; the best by requests/s stays registered.
4. TorchServe's best, the eager local endpoint and the int8 one are loaded at 1, 8 and 32 clients
   in ``--rounds`` rounds, the servers' order rotating each time, so the machine's other work hits
   them alike; the medians over rounds are printed, then int8 / TorchServe and eager / TorchServe.

TorchServe runs from its own virtual environment (``--torchserve-venv``, default
``.venv-torchserve``), made once with

    python3 -m venv .venv-torchserve && .venv-torchserve/bin/pip install torch==2.14.1 \\
        torchvision==0.29.1 torchserve==0.12.0 torch-model-archiver==0.12.0 pyyaml captum

and Java 17 on the PATH. Then

    nice -n 10 .venv/bin/python benchmarks/torchserve_baseline.py --seconds 12 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.optimized_model import ABID, PHOTO, eager_model_uri, parity, show_row
from benchmarks.serve_endpoint import load
from benchmarks.train_quality import sample_channels
from bincount.config import Settings
from bincount.local.batcher import available_cores
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend
from bincount.models import fetch_model
from bincount.storage import Storage

MODEL = "bincount"
MANIFEST = "file_list.sample.json"
TORCHSERVE = "TorchServe"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def config_label(config: tuple[int, int, int]) -> str:
    workers, batch, delay = config
    return f"{workers} worker{'s' if workers > 1 else ''}, batch {batch}, delay {delay} ms"


def parse_config(text: str) -> tuple[int, int, int]:
    """``WORKERS:BATCH:DELAY_MS`` -> a TorchServe configuration."""
    try:
        workers, batch, delay = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WORKERS:BATCH:DELAY_MS, e.g. 1:8:10") from None
    if workers < 1 or batch < 1 or delay < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: workers and batch size at least 1, delay at least 0")
    return workers, batch, delay


class TorchServe:
    """A TorchServe 0.12 server of our own (its process group), serving archives of one model dir."""

    def __init__(self, venv: Path, model_dir: Path, scratch: Path, cores: int) -> None:
        for tool in ("torchserve", "torch-model-archiver"):
            if not (venv / "bin" / tool).is_file():
                raise SystemExit(f"{venv / 'bin' / tool} is missing: make TorchServe's venv as this file's doc says")
        self.venv, self.home, self.cores = venv, scratch / "torchserve", cores
        self.registered = False
        store = self.home / "model-store"
        store.mkdir(parents=True)
        for threads in sorted({max(1, cores // workers) for workers in (1, 2)}):
            self._archive(model_dir, store, threads)
        self.inference, self.management = free_port(), free_port()
        config = self.home / "config.properties"
        config.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{self.inference}",
                    f"management_address=http://127.0.0.1:{self.management}",
                    f"metrics_address=http://127.0.0.1:{free_port()}",
                    f"model_store={store}",
                    "disable_system_metrics=true",
                    "enable_metrics_api=false",
                    "job_queue_size=1000",
                    "default_response_timeout=300",
                ]
            )
            + "\n"
        )
        self._log = (self.home / "torchserve.out").open("ab")
        self.process = subprocess.Popen(
            [
                str(venv / "bin" / "torchserve"),
                *("--start", "--foreground", "--ncs", "--disable-token-auth", "--enable-model-api"),
                *("--ts-config", str(config), "--model-store", str(store)),
            ],
            cwd=self.home,
            env={**os.environ, "LOG_LOCATION": str(self.home / "logs"), "METRICS_LOCATION": str(self.home / "logs")},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: java and its Python workers end with it
        )
        self._wait_ready()

    def _archive(self, model_dir: Path, store: Path, threads: int) -> None:
        """``<MODEL>-<threads>t.mar``: the model dir, ``sm_scripts`` and the handler; ``threads`` torch threads."""
        yaml = self.home / f"model-config-{threads}t.yaml"
        yaml.write_text(f"handler:\n  threads: {threads}\n")
        subprocess.run(
            [
                str(self.venv / "bin" / "torch-model-archiver"),
                *("--model-name", f"{MODEL}-{threads}t", "--version", "1.0", "--export-path", str(store)),
                *("--serialized-file", str(model_dir / "model.pt")),
                *("--handler", str(ROOT / "benchmarks" / "torchserve_handler.py")),
                *("--extra-files", f"{model_dir / 'model_info.json'},{ROOT / 'sm_scripts'}"),
                *("--config-file", str(yaml)),
            ],
            check=True,
        )

    def _wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"TorchServe exited ({self.process.returncode}): see {self.home}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.inference}/ping", timeout=2):
                    return
            except (OSError, urllib.error.URLError):
                time.sleep(1)
        raise SystemExit(f"TorchServe did not answer /ping in {timeout_s:.0f} s: see {self.home}")

    def _manage(self, method: str, path: str) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{self.management}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                response.read()
        except urllib.error.HTTPError as error:
            raise SystemExit(f"TorchServe {method} {path}: {error.code} {error.read()[:500]!r}") from None

    def register(self, config: tuple[int, int, int]) -> None:
        """Serve the model as ``MODEL`` with ``config`` (replacing what served before); returns once loaded."""
        workers, batch, delay = config
        query = urllib.parse.urlencode(
            {
                "url": f"{MODEL}-{max(1, self.cores // workers)}t.mar",
                "model_name": MODEL,
                "batch_size": batch,
                "max_batch_delay": delay,
                "initial_workers": workers,
                "synchronous": "true",
            }
        )
        if self.registered:
            self._manage("DELETE", f"/models/{MODEL}")
        self._manage("POST", f"/models?{query}")
        self.registered = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.inference}"

    def close(self) -> None:
        """End TorchServe's whole process group (the CLI, java, its workers)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers that outlived the frontend
        self._log.close()


def warm_up(url: str, path: str, photo: bytes) -> None:
    """8 clients for a few seconds: the first batches of a fresh server (and TorchServe's JVM) are slow."""
    load(url, photo, 8, 4.0, path=path)


def torchserve_sweep(
    server: TorchServe, photo: bytes, configs: list[tuple[int, int, int]], seconds: float
) -> tuple[int, int, int]:
    """Each configuration at 8 clients; registers and returns the best by requests/s."""
    print(f"\n{TORCHSERVE} configurations at 8 clients:", flush=True)
    rates = {}
    for config in configs:
        server.register(config)
        warm_up(server.url, f"/predictions/{MODEL}", photo)
        row = load(server.url, photo, 8, seconds, path=f"/predictions/{MODEL}")
        rates[config] = row["req_s"]
        print(f"  {show_row(config_label(config) + ':', row)}", flush=True)
    best = max(rates, key=rates.__getitem__)
    print(f"best: {config_label(best)}", flush=True)
    server.register(best)
    return best


def rounds(
    targets: dict[str, tuple[str, str]], photo: bytes, args: argparse.Namespace
) -> dict[tuple[str, int], list[dict[str, float]]]:
    """``args.rounds`` rounds of every client count on every server, the order rotating; each row's rounds."""
    rows: dict[tuple[str, int], list[dict[str, float]]] = {}
    labels = list(targets)
    for number in range(args.rounds):
        order = labels[number % len(labels) :] + labels[: number % len(labels)]
        print(f"round {number + 1} (load average {os.getloadavg()[0]:.1f}):", flush=True)
        for clients in args.clients:
            for label in order:
                url, path = targets[label]
                row = load(url, photo, clients, args.seconds, path=path)
                rows.setdefault((label, clients), []).append(row)
                print(f"  {clients:>2} clients {show_row(f'{label:>10}', row)}", flush=True)
    return rows


def median_row(measured: list[dict[str, float]]) -> dict[str, float]:
    return {
        "req_s": statistics.median(r["req_s"] for r in measured),
        "p50_ms": statistics.median(r["p50_ms"] for r in measured),
        "p99_ms": statistics.median(r["p99_ms"] for r in measured),
        "errors": sum(r["errors"] for r in measured),
    }


def summary(
    rows: dict[tuple[str, int], list[dict[str, float]]], clients: list[int], best: tuple[int, int, int], rounds_run: int
) -> None:
    print(f"\nmedians over {rounds_run} rounds; {TORCHSERVE} = {config_label(best)}:")
    for count in clients:
        base = median_row(rows[(TORCHSERVE, count)])
        print(f"  {count:>2} clients {show_row(f'{TORCHSERVE:>10}', base)}")
        for label in ("eager", "int8"):
            row = median_row(rows[(label, count)])
            ratio = f"{row['req_s'] / max(base['req_s'], 1e-9):.2f}x req/s, p99 {row['p99_ms'] / base['p99_ms']:.2f}x"
            print(f"             {show_row(f'{label:>10}', row)} | {label}/{TORCHSERVE}: {ratio}")


def main(args: argparse.Namespace) -> None:
    cores = available_cores()
    threads = args.threads or cores
    torch.set_num_threads(threads)
    if not (ABID / MANIFEST).is_file():
        raise SystemExit(f"the real ABID sample is not at {ABID}: this benchmark measures on real photos")
    storage, photo = Storage(), PHOTO.read_bytes()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        channels = sample_channels(ABID, MANIFEST, scratch, args.test_images)
        eager_uri = eager_model_uri(args, scratch)
        print(
            f"{args.model_uri or f'untrained {args.arch} at {args.image_size} px'}; photo {PHOTO.name}; "
            f"{threads} threads, {cores} cores; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        int8_uri = parity(storage, eager_uri, channels, scratch / "optimized.tar.gz", args.calibration_images).model_uri
        eager_dir, _ = fetch_model(storage, eager_uri, scratch / "models")
        server = TorchServe(args.torchserve_venv, eager_dir, scratch, threads)
        backend = LocalServingBackend(
            Settings.load(artifact_root=str(scratch / "artifacts")),
            host_options=HostOptions(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, threads=threads),
        )
        deployed: list[str] = []
        try:
            best = torchserve_sweep(server, photo, args.configs, args.seconds)
            targets = {TORCHSERVE: (server.url, f"/predictions/{MODEL}")}
            for label, uri in (("eager", eager_uri), ("int8", int8_uri)):
                record = backend.deploy(f"bench-{label}", uri)
                deployed.append(f"bench-{label}")
                targets[label] = (record.url, f"/endpoints/bench-{label}/invocations")
            for url, path in targets.values():
                warm_up(url, path, photo)
            print(
                f"\nlocal endpoints: micro-batches of up to {args.max_batch_size}, wait {args.max_wait_ms} ms",
                flush=True,
            )
            rows = rounds(targets, photo, args)
        finally:
            for name in deployed:
                backend.delete(name)
            server.close()
        summary(rows, args.clients, best, args.rounds)
    print(f"load average {os.getloadavg()[0]:.1f} (other processes on these cores skew every figure)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="TorchServe 0.12 against the eager and int8 local endpoints.")
    parser.add_argument("--arch", default="resnet50", help="the untrained model's arch (default: resnet50)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (default: 224)")
    parser.add_argument("--model-uri", default=None, help="a trained model.tar.gz instead of an untrained model")
    parser.add_argument("--calibration-images", type=int, default=300, help="training images to calibrate on (300)")
    parser.add_argument("--test-images", type=int, default=460, help="test images of the parity check (460: all)")
    parser.add_argument(
        "--configs",
        type=parse_config,
        nargs="+",
        default=[parse_config(c) for c in ("1:1:5", "1:4:10", "1:8:5", "1:8:10", "1:8:20", "2:4:10", "2:8:10")],
        help="TorchServe WORKERS:BATCH:DELAY_MS to try at 8 clients (default: 1:1:5 1:4:10 1:8:5 1:8:10 1:8:20 "
        "2:4:10 2:8:10)",
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="closed-loop clients (1 8 32)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per load level (default: 15)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the servers (default: 2)")
    parser.add_argument("--max-batch-size", type=int, default=HostOptions.max_batch_size, help="local host batch bound")
    parser.add_argument("--max-wait-ms", type=float, default=HostOptions.max_wait_ms, help="local host batch wait")
    parser.add_argument("--threads", type=int, default=None, help="model threads (default: cores available)")
    parser.add_argument(
        "--torchserve-venv", type=Path, default=ROOT / ".venv-torchserve", help="(default: .venv-torchserve)"
    )
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
