"""The optimized model (OpenVINO int8) against the eager one: parity, forward, endpoint and batch transform.

One run, side by side, on the real ABID sample (``../shared/data/abid``, split 80/10/10 as
``train_quality.py --seeds 0`` splits it, so a model it trained is judged on its own test side):

1. the optimize stage itself (``bincount.optimize.optimize_model``): calibrated on training images,
   accuracy-controlled on the valid side, scored against eager on the test side (accuracy of each,
   the delta, top-1 agreement, how many layers stayed fp32);
2. the bare forward of each path at batch 1, 8 and 16, and of the optimized one at 1 and 2 threads
   (the thread count the host gives it); when the stage's model has fp32 layers, also of plain int8
   (the stage under a bar that reverts nothing), to show what those layers cost;
3. a local endpoint (router + host, as deployed) for each, at 1, 8 and 32 closed-loop clients on a
   real photo: requests/s, p50, p99, errors; then the optimized endpoint's micro-batch bound swept
   at 8 clients;
4. local batch transform of the same real test images with each, at the same batch size.

The model is an untrained network of the real architecture (batch-norm statistics set, as
``write_untrained_model_dir`` does) unless ``--model-uri`` names a trained ``model.tar.gz``: with
an untrained one the accuracies are near chance, and top-1 agreement is the figure that shows
parity.

    .venv/bin/python benchmarks/optimized_model.py --seconds 15
    .venv/bin/python benchmarks/optimized_model.py --parity-only --model-uri file:///.../model.tar.gz
    .venv/bin/python benchmarks/optimized_model.py --forward-only --model-uri file:///.../model.tar.gz
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_endpoint import load
from benchmarks.train_quality import sample_channels
from bincount.config import Settings
from bincount.local.batch import run_batch_transform
from bincount.local.batcher import available_cores, prepare_model_thread
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend
from bincount.models import fetch_model, model_version, pack_folder, write_untrained_model_dir
from bincount.optimize import MAX_ACCURACY_DROP, Optimization, optimize_model
from bincount.storage import Storage
from sm_scripts import inference

ABID = ROOT.parent / "shared" / "data" / "abid"
PHOTO = ABID / "bucket" / "bin-images" / "01000.jpg"
NAME = "bench-optimized"


def bare_forward(model_dir: Path, pixels: torch.Tensor, batch_size: int, threads: int, seconds: float) -> float:
    """Images/s of ``inference.forward`` alone at ``batch_size``, on a thread set up as a host's model thread."""

    def measure() -> float:
        model = inference.model_fn(str(model_dir))
        batch = pixels[:batch_size]
        inference.forward(batch, model)  # warm up this shape
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            inference.forward(batch, model)
            done += len(batch)
        return done / (time.perf_counter() - start)

    with ThreadPoolExecutor(1, initializer=prepare_model_thread, initargs=(threads,)) as model_thread:
        return model_thread.submit(measure).result()


def endpoint_rows(
    backend: LocalServingBackend, model_uri: str, options: HostOptions, photo: bytes, clients: list[int], seconds: float
) -> dict[int, dict[str, float]]:
    """req/s, p50, p99 and errors of a local endpoint serving ``model_uri`` at each client count."""
    backend.host_options = options
    record = backend.deploy(NAME, model_uri)
    load(record.url, photo, 2, 3.0, NAME)  # warm up
    rows = {count: load(record.url, photo, count, seconds, NAME) for count in clients}
    backend.delete(NAME)
    return rows


def eager_model_uri(args: argparse.Namespace, scratch: Path) -> str:
    """``--model-uri``, or an untrained ``--arch`` at ``--image-size`` packed under ``scratch``."""
    if args.model_uri:
        return args.model_uri
    folder = write_untrained_model_dir(scratch / "eager", args.arch, args.image_size)
    return pack_folder(folder, scratch / "eager.tar.gz").as_uri()


def parity(
    storage: Storage,
    eager_uri: str,
    channels: dict[str, Path],
    output: Path,
    calibration: int,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
) -> Optimization:
    """Run the optimize stage; print its parity figures; return what it did (exits if it kept eager)."""
    result = optimize_model(
        storage,
        eager_uri,
        channels["train"].as_uri(),
        channels["valid"].as_uri(),
        channels["test"].as_uri(),
        output.as_uri(),
        calibration_images=calibration,
        max_accuracy_drop=max_accuracy_drop,
    )
    print(
        f"optimize stage, bar {100 * max_accuracy_drop:.1f} points ({result.seconds:.0f} s, "
        f"{result.calibration_images} calibration images, accuracy control on "
        f"{result.validation_images} valid images: {result.int8_layers} layers int8, {result.fp32_layers} fp32): "
        f"{result.reason}"
    )
    if not result.optimized:
        raise SystemExit("the optimized model did not pass parity: nothing to compare")
    assert result.eager_accuracy is not None and result.optimized_accuracy is not None
    delta = 100 * (result.optimized_accuracy - result.eager_accuracy)
    print(f"accuracy delta on the real test side: {delta:+.2f} points ({result.images} images)", flush=True)
    return result


def forward_sweep(
    eager_dir: Path, optimized_dir: Path, plain_dir: Path | None, photo: bytes, threads: int, seconds: float
) -> None:
    """The bare forward of both paths at batch 1, 8, 16 (and of plain int8, nothing reverted to fp32,
    when the stage's model has fp32 layers); the int8 one at 1 thread too."""
    probe = inference.model_fn(str(eager_dir))
    pixels = inference.preprocess(inference.input_fn(photo, "image/jpeg"), probe).repeat(16, 1, 1, 1)
    print("\nbare forward, images/s:")
    for batch in (1, 8, 16):
        eager = bare_forward(eager_dir, pixels, batch, threads, seconds)
        fast = bare_forward(optimized_dir, pixels, batch, threads, seconds)
        row = f"  batch {batch:>2}: eager {eager:6.1f}, int8 {fast:6.1f} ({fast / eager:.2f}x)"
        if plain_dir is not None:
            plain = bare_forward(plain_dir, pixels, batch, threads, seconds)
            row += f", plain int8 (nothing reverted) {plain:6.1f} ({plain / eager:.2f}x)"
        print(row, flush=True)
    if threads > 1:
        for batch in (1, 8):
            one = bare_forward(optimized_dir, pixels, batch, 1, seconds)
            print(f"  int8 batch {batch:>2} with 1 thread: {one:6.1f}", flush=True)


def show_row(label: str, row: dict[str, float]) -> str:
    return f"{label} {row['req_s']:5.1f} req/s p50 {row['p50_ms']:5.0f} p99 {row['p99_ms']:5.0f} ms err {row['errors']}"


def serving_sweep(
    scratch: Path, eager_uri: str, optimized_uri: str, photo: bytes, threads: int, args: argparse.Namespace
) -> None:
    """Both endpoints at each client count, then the int8 one at 8 clients by micro-batch bound."""
    backend = LocalServingBackend(Settings.load(artifact_root=str(scratch / "artifacts")))
    options = HostOptions(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, threads=threads)
    print(f"\nendpoint (micro-batches of up to {args.max_batch_size}, wait {args.max_wait_ms} ms):", flush=True)
    served = {
        label: endpoint_rows(backend, uri, options, photo, args.clients, args.seconds)
        for label, uri in (("eager", eager_uri), ("int8", optimized_uri))
    }
    for count in args.clients:
        eager, fast = served["eager"][count], served["int8"][count]
        ratios = f"{fast['req_s'] / max(eager['req_s'], 1e-9):.2f}x req/s, p99 {fast['p99_ms'] / eager['p99_ms']:.2f}x"
        print(f"  {count:>2} clients: {show_row('eager', eager)} | {show_row('int8', fast)} | {ratios}", flush=True)
    print("int8 endpoint at 8 clients by micro-batch bound:")
    for bound in args.sweep_batch_sizes:
        swept = HostOptions(max_batch_size=bound, max_wait_ms=args.max_wait_ms, threads=threads)
        (row,) = endpoint_rows(backend, optimized_uri, swept, photo, [8], args.seconds).values()
        print(f"  {show_row(f'max batch {bound:>2}:', row)}", flush=True)


def batch_transform_rates(
    scratch: Path, model_dirs: dict[str, Path], test_channel: Path, images: int, batch_size: int
) -> None:
    """Local batch transform of the same real test images with each model, at the same batch size."""
    test_images = sorted(test_channel.rglob("*.jpg"))[:images]
    batch_input = scratch / "batch-input"
    batch_input.mkdir()
    for path in test_images:
        (batch_input / path.name).symlink_to(path.resolve())
    rates = {}
    for label, model_dir in model_dirs.items():
        summary = run_batch_transform(
            Storage(),
            model_dir,
            model_version(model_dir),
            batch_input.as_uri(),
            (scratch / f"batch-output-{label}").as_uri(),
            batch_size=batch_size,
        )
        assert summary.scored == len(test_images) and summary.failed == 0, summary
        rates[label] = summary.images_per_s
    print(
        f"\nbatch transform, {len(test_images)} real test images, batch {batch_size}: eager "
        f"{rates['eager']:.1f} images/s, int8 {rates['int8']:.1f} ({rates['int8'] / rates['eager']:.2f}x)"
    )


def main(args: argparse.Namespace) -> None:
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    if not (ABID / "file_list.sample.json").is_file():
        raise SystemExit(f"the real ABID sample is not at {ABID}: this benchmark measures on real photos")
    storage, photo = Storage(), PHOTO.read_bytes()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        channels = sample_channels(ABID, "file_list.sample.json", scratch)
        untrained = f"untrained {args.arch} at {args.image_size} px"
        eager_uri = eager_model_uri(args, scratch)
        print(
            f"{args.model_uri or untrained}; {threads} threads, {available_cores()} cores; "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        stage = parity(storage, eager_uri, channels, scratch / "optimized.tar.gz", args.calibration_images)
        if args.parity_only:
            return
        optimized_uri, plain_dir = stage.model_uri, None
        if stage.fp32_layers:  # under a bar no model misses accuracy control reverts nothing: plain int8
            plain = parity(storage, eager_uri, channels, scratch / "plain.tar.gz", args.calibration_images, 1.0)
            plain_dir, _ = fetch_model(storage, plain.model_uri, scratch / "models")
        eager_dir, _ = fetch_model(storage, eager_uri, scratch / "models")
        optimized_dir, _ = fetch_model(storage, optimized_uri, scratch / "models")
        forward_sweep(eager_dir, optimized_dir, plain_dir, photo, threads, args.bare_seconds)
        if args.forward_only:
            return
        serving_sweep(scratch, eager_uri, optimized_uri, photo, threads, args)
        models = {"eager": eager_dir, "int8": optimized_dir}
        batch_transform_rates(scratch, models, channels["test"], args.images, args.batch_size)
    print(f"load average {os.getloadavg()[0]:.1f} (other processes on these cores skew every figure)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="The OpenVINO int8 model against eager: parity, forward, serving.")
    parser.add_argument("--arch", default="resnet50", help="the untrained model's arch (default: resnet50)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (default: 224)")
    parser.add_argument("--model-uri", default=None, help="a trained model.tar.gz instead of an untrained model")
    parser.add_argument("--calibration-images", type=int, default=300, help="training images to calibrate on (300)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="closed-loop clients (1 8 32)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per load level (default: 15)")
    parser.add_argument("--bare-seconds", type=float, default=4.0, help="seconds per bare forward (default: 4)")
    parser.add_argument("--max-batch-size", type=int, default=HostOptions.max_batch_size, help="host batch bound")
    parser.add_argument("--max-wait-ms", type=float, default=HostOptions.max_wait_ms, help="host batch wait")
    parser.add_argument(
        "--sweep-batch-sizes", type=int, nargs="*", default=[1, 4], help="int8 host batch bounds at 8 clients"
    )
    parser.add_argument("--images", type=int, default=160, help="test images for batch transform (default: 160)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch transform batch size (default: 16)")
    parser.add_argument("--threads", type=int, default=None, help="model threads (default: cores available)")
    parser.add_argument("--parity-only", action="store_true", help="stop after the optimize stage's parity figures")
    parser.add_argument("--forward-only", action="store_true", help="stop after the bare forward sweep")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
