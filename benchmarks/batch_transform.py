"""Batch transform throughput against the bare model forward and against one endpoint call per image.

All three score the same real ABID photos with the same untrained model of the real architecture:
- bare forward: ``inference.forward`` over pixels decoded beforehand, at ``--batch-size`` (the limit);
- batch transform: ``run_batch_transform`` from a folder to a folder (read, decode, forward, write);
- endpoint: a local endpoint, one ``invoke`` per image from one client, as a loop over images would.
The bare forward runs before and after the others; both figures are printed (the machine's noise).

    .venv/bin/python benchmarks/batch_transform.py --arch resnet50 --image-size 224 --images 128 --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bincount.config import Settings
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.serving.backend import LocalServingBackend, runtime_client
from bincount.serving.batch import run_batch_transform
from bincount.serving.batcher import prepare_model_thread
from bincount.serving.host import HostOptions, available_cores
from bincount.serving.model_dir import model_version, write_untrained_model_dir
from bincount.storage import Storage
from sm_scripts import inference

ROOT = Path(__file__).resolve().parents[1]
ABID_IMAGES = ROOT.parent / "shared" / "data" / "abid" / "bucket" / "bin-images"
NAME = "bench-batch"


def write_inputs(folder: Path, count: int) -> list[Path]:
    """``count`` real ABID photos (ids 01000 on: 224 px), or synthetic ones when the sample is absent."""
    folder.mkdir(parents=True)
    paths = []
    for number in range(count):
        target = folder / f"{1000 + number:05d}.jpg"
        source = ABID_IMAGES / target.name
        if source.is_file():
            shutil.copy(source, target)
        else:
            target.write_bytes(jpeg_bytes(render_bin_image(1 + number % 5, np.random.default_rng(number))))
        paths.append(target)
    return paths


def bare_forward(model_dir: Path, images: list[Path], batch_size: int, threads: int) -> float:
    """Images/s of the forward alone over the images' pixels, in batches of ``batch_size``.

    Runs on a thread prepared as batch transform's model thread is, so both forwards run alike.
    """
    with ThreadPoolExecutor(1, initializer=prepare_model_thread, initargs=(threads,)) as model_thread:
        return model_thread.submit(_bare_forward, model_dir, images, batch_size).result()


def _bare_forward(model_dir: Path, images: list[Path], batch_size: int) -> float:
    model = inference.model_fn(str(model_dir))
    pixels = torch.cat([inference.preprocess(inference.input_fn(p.read_bytes(), "image/jpeg"), model) for p in images])
    inference.forward(pixels[:batch_size], model)  # warm up
    start = time.perf_counter()
    for first in range(0, len(pixels), batch_size):
        inference.forward(pixels[first : first + batch_size], model)
    return len(pixels) / (time.perf_counter() - start)


def main(args: argparse.Namespace) -> None:
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        images = write_inputs(scratch / "input", args.images)
        model_dir = write_untrained_model_dir(scratch / "model", args.arch, args.image_size)
        print(
            f"{args.arch} at {args.image_size} px, {len(images)} images, batch size {args.batch_size}, "
            f"{threads} torch threads; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        bare_before = bare_forward(model_dir, images, args.batch_size, threads)
        print(f"bare forward:       {bare_before:6.1f} images/s", flush=True)

        started = time.perf_counter()
        summary = run_batch_transform(
            Storage(),
            model_dir,
            model_version(model_dir),
            (scratch / "input").as_uri(),
            (scratch / "output").as_uri(),
            batch_size=args.batch_size,
        )
        wall = time.perf_counter() - started
        assert summary.scored == len(images) and summary.failed == 0, summary
        print(
            f"batch transform:    {summary.images_per_s:6.1f} images/s while scoring "
            f"({len(images) / wall:.1f} images/s counting model load and the results table)",
            flush=True,
        )

        backend = LocalServingBackend(
            Settings.load(artifact_root=str(scratch / "artifacts")),
            host_options=HostOptions(max_batch_size=args.batch_size, threads=threads),
        )
        record = backend.deploy(NAME, model_dir.as_uri())
        client = runtime_client(record.url, max_attempts=1)
        calls = images[: args.endpoint_images]
        start = time.perf_counter()
        for path in calls:
            client.invoke_endpoint(EndpointName=NAME, Body=path.read_bytes(), ContentType="image/jpeg")["Body"].read()
        per_call = len(calls) / (time.perf_counter() - start)
        backend.delete(NAME)
        print(f"endpoint per image: {per_call:6.1f} images/s ({len(calls)} calls, one client)", flush=True)

        bare_after = bare_forward(model_dir, images, args.batch_size, threads)
        print(f"bare forward again: {bare_after:6.1f} images/s; load average {os.getloadavg()[0]:.1f}")

    for label, bare in (("before", bare_before), ("after", bare_after)):
        print(
            f"batch transform = {summary.images_per_s / bare:6.1%} of bare forward ({label}); "
            f"{summary.images_per_s / per_call:.2f}x one endpoint call per image"
        )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Batch transform images/s vs bare forward and vs per-image endpoint calls."
    )
    parser.add_argument("--arch", default="resnet50", help="resnet18, resnet34 or resnet50 (default: resnet50)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (default: 224)")
    parser.add_argument("--images", type=int, default=128, help="images to score (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward (default: 8)")
    parser.add_argument(
        "--endpoint-images", type=int, default=64, help="images sent one by one to the endpoint (default: 64)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores available)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
