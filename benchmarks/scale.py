"""Scale: wall time and peak resident memory of training input as the channel grows, old way against new.

For each N (default 5k and 20k), a synthetic ABID-like channel (``<count>/<id>.jpg``, 5 counts, small
JPEGs like the bin photos' texture, hard links to a pool of distinct photos so N costs no disk) goes
through the training input path in a fresh process per way, so each peak is that way's alone:

- old: every image decoded into one in-memory uint8 tensor (what train.py did before the cache file:
  reimplemented here, since train.py no longer has it);
- new: ``load_channel`` with a cache dir (decode once into a memory-mapped file), then the same channel
  opened again (what a second run, or another data-parallel process, pays);

then two shuffled passes of ``batches`` (flip augmentation, normalization) at ``--image-size`` through
a tiny network with an SGD step, so the data path dominates (the faster epoch counts). Peak resident
memory is the process's ``ru_maxrss``, which counts the cache file's pages mapped into it; "above
start" subtracts the process's resident memory after its imports. Each way runs ``--repeats`` times per
N, alternating with the other: the table keeps each time's fastest and each peak's largest.

``--throughput`` answers another question: images per second on the real ABID sample at 224 px from
the in-memory tensor and from the cache file, interleaved, medians: of the data path alone
(``batches`` with train.py's default flip augmentation), then of training resnet18 (as
``train_throughput.py``).

``--stages`` measures every stage instead (docs/SCALE.md): N distinct synthetic 64x64 photos with
ABID-like metadata (made once under ``--scratch``) served from the loopback S3 (``--store s3``) or
``file://`` folders go through download, split, validate, upload, one training epoch, evaluation,
batch transform and the monitor over N captured requests, each stage in a process of its own (peak:
its ``VmHWM``); each (N, stage) is appended to ``--results``, and ``--report`` makes the table and
the plot from them.

    nice .venv/bin/python benchmarks/scale.py                         # N = 5000, 20000 at 64 px
    nice .venv/bin/python benchmarks/scale.py --sizes 5000 20000 80000
    nice .venv/bin/python benchmarks/scale.py --throughput            # old vs new images/s on the sample
    nice .venv/bin/python benchmarks/scale.py --stages --store file --sizes 5000 20000 80000
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bincount.capture import CaptureReader, Exchange, capture_prefix, capture_record
from bincount.download import Ledger, download_images, image_path
from bincount.evaluation import evaluate_model
from bincount.local.batch import run_batch_transform
from bincount.loopback_s3 import LoopbackS3
from bincount.models import write_untrained_model_dir
from bincount.monitoring import FEATURES, Baseline, DriftThresholds, TrafficWindow, image_statistics, monitor_window
from bincount.split import SPLIT_FILE, read_split, record_split
from bincount.storage import Storage, join_uri, local_path
from bincount.upload import sync_channels
from bincount.validation import ValidationThresholds, validate_dataset
from sm_scripts.data import ImageCache, batches, channel_files, find_classes, load_channel
from sm_scripts.distributed import SINGLE
from sm_scripts.loop import Runtime, Training, train_one_epoch
from sm_scripts.monitoring import StepTimes
from sm_scripts.networks import IMAGENET_MEAN, IMAGENET_STD, build_model
from sm_scripts.preprocessing import channel_values, load_image

ABID = ROOT.parent / "shared" / "data" / "abid"
POOL = 500  # distinct photos the channels link to
COUNTS = ("1", "2", "3", "4", "5")


def photo_pool(folder: Path, seed: int) -> list[Path]:
    """``POOL`` distinct JPEGs of ABID's shape at a quarter of its size (ABID: about 500x400, here 128x104):
    smooth noise with blobs, quality 85."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(POOL):
        base = rng.integers(40, 200, size=(13, 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((128, 104), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 12, size=(104, 128, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        path = folder / f"{index}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def synthetic_channel(root: Path, images: int, pool: list[Path]) -> Path:
    """A channel of ``images`` photos, spread over the counts, each a hard link to a pool photo."""
    for index in range(images):
        folder = root / COUNTS[index % len(COUNTS)]
        folder.mkdir(parents=True, exist_ok=True)
        os.link(pool[index % len(pool)], folder / f"{index:07d}.jpg")
    return root


def decode_in_memory(root: Path, classes: list[str], image_size: int, threads: int) -> ImageCache:
    """The old way: every image decoded and resized into one in-memory tensor."""
    files, labels = channel_files(root, classes)
    images = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for index, image in enumerate(pool.map(lambda path: load_image(path.read_bytes(), image_size), files)):
            images[index] = image
    return ImageCache(images, torch.tensor(labels, dtype=torch.long), [str(p) for p in files])


def tiny_network() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, len(COUNTS))
    )


def resident_mb() -> float:
    """This process's resident memory now (VmRSS), in MB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def child(args: argparse.Namespace) -> None:
    """One way over one channel in this fresh process; prints its figures as one JSON line."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classes = find_classes(args.channel)
    start_mb = resident_mb()
    figures: dict[str, float] = {}
    start = time.perf_counter()
    if args.child == "old":
        cache = decode_in_memory(args.channel, classes, args.image_size, args.threads)
        figures["build_s"] = time.perf_counter() - start
    else:
        load_channel(args.channel, classes, args.image_size, args.threads, args.cache_dir)  # decodes into the file
        figures["build_s"] = time.perf_counter() - start
        start = time.perf_counter()
        cache = load_channel(args.channel, classes, args.image_size, args.threads, args.cache_dir)  # reuses it
        figures["reopen_s"] = time.perf_counter() - start
    network = tiny_network().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
    mean, std = channel_values(IMAGENET_MEAN), channel_values(IMAGENET_STD)
    runtime = Runtime(torch.device("cpu"), False, args.threads, SINGLE)
    epochs = []
    for epoch in range(2):  # the faster of two: this machine is shared
        generator = torch.Generator().manual_seed(epoch)
        training = Training(
            network, network, nn.CrossEntropyLoss(), optimizer, scheduler=None, generator=generator, mean=mean, std=std
        )
        data = batches(
            cache, 64, runtime.device, mean, std, True, augmentation="flip", generator=generator, min_batch=2
        )
        start = time.perf_counter()
        train_one_epoch(training, runtime, data, StepTimes())
        epochs.append(time.perf_counter() - start)
    figures["epoch_s"] = min(epochs)
    figures["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures["start_mb"] = start_mb
    print(json.dumps(figures), flush=True)


def steadiest(runs: list[dict[str, float]]) -> dict[str, float]:
    """The fastest of each time over the repeats, and the largest peak."""
    return {key: (max if key.endswith("_mb") else min)(run[key] for run in runs) for key in runs[0]}


def run_child(way: str, channel: Path, cache_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", way, "--channel", str(channel), "--cache-dir", str(cache_dir)]
    command += ["--image-size", str(args.image_size), "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def scale(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-") as scratch:
        pool = photo_pool(Path(scratch) / "pool", seed=0)
        for size in args.sizes:
            channel = synthetic_channel(Path(scratch) / f"n{size}" / "train", size, pool)
            cache_dir = Path(scratch) / f"n{size}" / "cache"
            runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
            for _ in range(args.repeats):  # alternated: this machine is shared and its load drifts
                for way in ("old", "new"):
                    subprocess.run(["rm", "-rf", str(cache_dir)], check=True)
                    runs[way].append(run_child(way, channel, cache_dir, args))
            old, new = (steadiest(runs[way]) for way in ("old", "new"))
            cache_mb = sum(p.stat().st_size for p in cache_dir.glob("*.u8")) / 1e6
            rows.append((size, old, new, cache_mb))
            print(f"N={size}: old {old}, new {new}, cache file {cache_mb:.0f} MB", flush=True)
            subprocess.run(["rm", "-rf", str(channel.parent)], check=True)
    print(
        f"\n{args.image_size} px, batch 64, {args.threads} threads, one epoch through a tiny network (best of 2); "
        "peak = ru_maxrss, above start = peak - resident after imports\n"
    )
    print(
        "| N | old: decode s | new: build s | new: reopen s | old: epoch s | new: epoch s | "
        "old: peak MB (above start) | new: peak MB (above start) | cache file MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size, old, new, cache_mb in rows:
        print(
            f"| {size} | {old['build_s']:.1f} | {new['build_s']:.1f} | {new['reopen_s']:.2f} | {old['epoch_s']:.1f} | "
            f"{new['epoch_s']:.1f} | {old['peak_mb']:.0f} ({old['peak_mb'] - old['start_mb']:.0f}) | "
            f"{new['peak_mb']:.0f} ({new['peak_mb'] - new['start_mb']:.0f}) | {cache_mb:.0f} |"
        )
    (first, old0, new0, _), (last, old1, new1, _) = rows[0], rows[-1]
    print(
        f"\nfrom N={first} to N={last} ({last / first:.0f}x images): peak memory "
        f"old {old1['peak_mb'] / old0['peak_mb']:.2f}x, "
        f"new {new1['peak_mb'] / new0['peak_mb']:.2f}x; build time old {old1['build_s'] / old0['build_s']:.1f}x, "
        f"new {new1['build_s'] / new0['build_s']:.1f}x; epoch time old {old1['epoch_s'] / old0['epoch_s']:.1f}x, "
        f"new {new1['epoch_s'] / new0['epoch_s']:.1f}x"
    )
    print(
        f"at N={last}: new/old build time {new1['build_s'] / old1['build_s']:.2f}x, epoch time "
        f"{new1['epoch_s'] / old1['epoch_s']:.2f}x, peak memory {new1['peak_mb'] / old1['peak_mb']:.2f}x"
    )


def sample_channel(root: Path, images: int) -> Path:
    """A channel of ``images`` real ABID sample photos (symlinks), spread over the counts."""
    manifest = json.loads((ABID / "file_list.sample.json").read_text())
    for count, paths in manifest.items():
        for path in paths[: images // len(manifest)]:
            link = root / count / f"{Path(path).stem}.jpg"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(ABID / "bucket" / "bin-images" / f"{Path(path).stem}.jpg")
    return root


def throughput(args: argparse.Namespace) -> None:
    """Training images/s on the ABID sample from the in-memory tensor and from the cache file, interleaved."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="scale-throughput-") as scratch:
        channel = sample_channel(Path(scratch) / "train", args.sample_images)
        classes = find_classes(channel)
        start = time.perf_counter()
        caches = {"old": decode_in_memory(channel, classes, 224, args.threads)}
        decoded_at = time.perf_counter()
        caches["new"] = load_channel(channel, classes, 224, args.threads, Path(scratch) / "cache")
        built_at = time.perf_counter()
        print(
            f"{len(caches['old'])} photos at 224 px: old decode {decoded_at - start:.1f} s, new build "
            f"{built_at - decoded_at:.1f} s ({len(caches['old']) / (built_at - decoded_at):.1f} photos/s)",
            flush=True,
        )
        device = torch.device("cpu")
        mean, std = channel_values(IMAGENET_MEAN), channel_values(IMAGENET_STD)
        alone: dict[str, list[float]] = {"old": [], "new": []}
        for round_ in range(args.data_rounds):  # the data path alone: what the cache file can change
            for way in ("old", "new") if round_ % 2 else ("new", "old"):
                generator = torch.Generator().manual_seed(round_)
                start = time.perf_counter()
                for _ in batches(
                    caches[way], 32, device, mean, std, True, augmentation="flip", generator=generator, min_batch=2
                ):
                    pass
                alone[way].append(len(caches[way]) / (time.perf_counter() - start))
        old, new = statistics.median(alone["old"]), statistics.median(alone["new"])
        print(
            f"data path alone (batches: gather, flip, normalize), medians of {args.data_rounds} passes: old "
            f"{old:.0f}, new {new:.0f} images/s: ratio {new / old:.3f}",
            flush=True,
        )
        first = build_model("resnet18", len(classes))
        models = {"old": first, "new": build_model("resnet18", len(classes))}
        models["new"].load_state_dict(first.state_dict())
        for model in models.values():
            model.to(memory_format=torch.channels_last)
        optimizers = {way: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for way, m in models.items()}
        rates: dict[str, list[float]] = {"old": [], "new": []}
        runtime = Runtime(device, False, args.threads, SINGLE)
        for epoch in range(args.epochs + 1):  # epoch 0: warm-up, untimed
            for way in ("old", "new") if epoch % 2 else ("new", "old"):  # alternated: neither always goes first
                generator = torch.Generator().manual_seed(epoch)
                data = batches(
                    caches[way], 32, device, mean, std, True, augmentation="flip", generator=generator, min_batch=2
                )
                training = Training(
                    models[way],
                    models[way],
                    nn.CrossEntropyLoss(),
                    optimizers[way],
                    scheduler=None,
                    generator=generator,
                    mean=mean,
                    std=std,
                )
                ips = train_one_epoch(training, runtime, data, StepTimes())[2]
                if epoch:
                    rates[way].append(ips)
            if epoch:
                print(
                    f"epoch {epoch}: old {rates['old'][-1]:.1f} images/s, new {rates['new'][-1]:.1f} images/s",
                    flush=True,
                )
    old, new = statistics.median(rates["old"]), statistics.median(rates["new"])
    print(
        f"\nresnet18 224 px, batch 32, {len(caches['old'])} ABID sample photos, {args.threads} threads, medians of "
        f"{args.epochs} epochs: old (in memory) {old:.1f}, new (cache file) {new:.1f} images/s: ratio {new / old:.3f}"
    )


# --- Every stage (--stages): synthetic ABID-like buckets through the pipeline's stages, one process each ---

STAGES = ("download", "split", "validate", "upload", "train", "evaluate", "batch", "monitor")
SOURCE = "s3://abid-scale"  # the synthetic bucket: bin-images/<id>.jpg, metadata/<id>.json
WORK = "s3://scale-work"
PHOTO_PX = 64
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1"}


def photo_id(index: int) -> str:
    return f"{index:07d}"


def photo_label(index: int) -> int:
    return 1 + index % len(COUNTS)


def generate_photos(folder: Path, images: int) -> None:
    """``images`` distinct 64x64 JPEGs (smooth noise, as ``photo_pool``) and ABID-like metadata, made once:
    photo ``i`` is the same bytes at every size and on every run (seeded by its index)."""
    (folder / "bin-images").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    for index in range(images):
        path = folder / "bin-images" / f"{photo_id(index)}.jpg"
        if path.exists():
            continue
        rng = np.random.default_rng(index)
        base = Image.fromarray(rng.integers(40, 200, size=(8, 8, 3), dtype=np.uint8))
        noise = rng.integers(-12, 12, size=(PHOTO_PX, PHOTO_PX, 3))
        smooth = np.asarray(base.resize((PHOTO_PX, PHOTO_PX), Image.Resampling.BICUBIC), dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
        label = photo_label(index)
        sku = f"B{index:09d}"
        metadata = {
            "BIN_FCSKU_DATA": {sku: {"asin": sku, "name": f"synthetic item {index}", "quantity": label}},
            "EXPECTED_QUANTITY": label,
            "image_fname": f"{photo_id(index)}.jpg",
        }
        (folder / "metadata" / f"{photo_id(index)}.json").write_text(json.dumps(metadata))
        atomic = path.with_suffix(".tmp")
        atomic.write_bytes(buffer.getvalue())
        atomic.rename(path)


def seed_bucket(s3: Any, photos: Path, start: int, end: int) -> None:
    """Put photos ``start`` to ``end`` (and their metadata) into the synthetic bucket."""
    bucket = SOURCE.removeprefix("s3://")

    def put(index: int) -> None:
        for folder, suffix in (("bin-images", ".jpg"), ("metadata", ".json")):
            key = f"{folder}/{photo_id(index)}{suffix}"
            s3.put_object(Bucket=bucket, Key=key, Body=(photos / key).read_bytes())

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(put, range(start, end)))


def capture_traffic(storage: Any, photos: Path, prefix: str, records: int) -> None:
    """``records`` captured requests (each photo inline, base64, as the front door writes them), 2,000 a file."""
    start = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    for first in range(0, records, 2000):
        lines = []
        for index in range(first, min(first + 2000, records)):
            predicted = photo_label(index)
            answer = {"predictions": [{"predicted_count": predicted, "probabilities": dict.fromkeys(COUNTS, 0.2)}]}
            exchange = Exchange(
                body=(photos / "bin-images" / f"{photo_id(index)}.jpg").read_bytes(),
                content_type="image/jpeg",
                answer=json.dumps(answer).encode(),
                answer_type="application/json",
                status=200,
                latency_ms=20.0 + index % 17,
                at=start + dt.timedelta(seconds=index),
            )
            lines.append(json.dumps(capture_record(exchange, max_inline_bytes=512 * 1024)))
        hour = (start + dt.timedelta(seconds=first)).strftime("%Y/%m/%d/%H")
        storage.write_bytes(join_uri(prefix, hour, f"scale-{first:08d}.jsonl"), ("\n".join(lines) + "\n").encode())


def train_channel(table: pd.DataFrame, mirror: Path, root: Path) -> Path:
    """The split's training side as a channel (``<count>/<id>.jpg``, hard links into the mirror)."""
    for row in table[table["split"] == "train"].itertuples():
        folder = root / str(row.label)
        folder.mkdir(parents=True, exist_ok=True)
        os.link(image_path(mirror, row.id), folder / f"{row.id}.jpg")
    return root


@dataclass(frozen=True)
class Place:
    """Where one size's run keeps its things."""

    images: int
    photos: Path  # the synthetic photos, made once
    source: str  # the bucket they are served from (the loopback S3, or the photos' folder as file://)
    local: Path  # this size's local folder: the mirror, the manifest, the training channel, the model
    work: str  # this size's prefix: the dataset, its channels, the batch output, the capture

    @property
    def mirror(self) -> Path:
        return self.local / "mirror"

    @property
    def dataset(self) -> str:
        return join_uri(self.work, "dataset")

    @property
    def channels(self) -> str:
        return join_uri(self.dataset, "channels")

    @property
    def capture(self) -> str:
        return capture_prefix(join_uri(self.work, "artifacts"), "scale")


def run_stage(stage: str, place: Place) -> dict[str, Any]:
    """One stage over one size, in this (fresh) process; returns its figures."""
    storage = Storage(os.environ["SCALE_S3"] or None)
    start_mb = resident_mb()
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if stage == "download":
        manifest = {photo_id(i): photo_label(i) for i in range(place.images)}
        report, _ = download_images(manifest, place.source, place.mirror, storage)
        extra["images"] = report.downloaded + report.already_present
    elif stage == "split":
        manifest = {photo_id(i): photo_label(i) for i in range(place.images)}
        view = record_split(storage, place.dataset, manifest, Ledger(place.mirror).read(), place.source)
        extra["images"] = len(view.table)
    elif stage == "validate":
        table = read_split(storage, join_uri(place.dataset, SPLIT_FILE))
        report = validate_dataset(table, place.mirror, None, ValidationThresholds())
        if not report.passed:
            raise SystemExit(report.failure_message())
        extra["images"] = len(table)
    elif stage == "upload":
        sync = sync_channels(
            read_split(storage, join_uri(place.dataset, SPLIT_FILE)), place.mirror, storage, place.channels
        )
        extra["images"] = sync.copied
    elif stage == "train":
        torch.set_num_threads(1)
        channel = place.local / "train"
        cache = load_channel(channel, find_classes(channel), PHOTO_PX, 1, place.local / "cache")
        network = tiny_network().to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
        mean, std = channel_values(IMAGENET_MEAN), channel_values(IMAGENET_STD)
        generator = torch.Generator().manual_seed(0)
        training = Training(network, network, nn.CrossEntropyLoss(), optimizer, None, generator, mean, std)
        runtime = Runtime(torch.device("cpu"), False, 1, SINGLE)
        data = batches(
            cache, 64, runtime.device, mean, std, True, augmentation="flip", generator=generator, min_batch=2
        )
        train_one_epoch(training, runtime, data, StepTimes())
        extra["images"] = len(cache)
    elif stage == "evaluate":
        evaluation = evaluate_model(storage, (place.local / "model").as_uri(), join_uri(place.channels, "test"))
        extra["images"] = evaluation.images
    elif stage == "batch":
        torch.set_num_threads(1)
        summary = run_batch_transform(
            storage, place.local / "model", "scale:1", place.channels, join_uri(place.work, "batch"), batch_size=64
        )
        extra["images"] = summary.scored
    else:
        window = TrafficWindow.read(CaptureReader(storage, place.capture))
        photos = [(place.photos / "bin-images" / f"{photo_id(i)}.jpg").read_bytes() for i in range(300)]
        sampled = [image_statistics(data) for data in photos]
        shares = dict.fromkeys(COUNTS, 0.2)
        baseline = Baseline("", "", shares, shares, {n: [v[n] for v in sampled] for n in FEATURES}, len(sampled))
        report = monitor_window("scale", window, baseline, DriftThresholds())
        extra["images"] = report.requests
    extra["seconds"] = time.perf_counter() - started
    extra["peak_mb"] = peak_mb()
    extra["start_mb"] = start_mb
    return extra


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB. Not ``ru_maxrss``: Linux carries that over from the
    parent at fork and through exec, so a child's would never read below its parent's size."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def stage_child(args: argparse.Namespace) -> None:
    place = Place(args.images, args.scratch / "photos", args.source, args.local, args.work)
    print(json.dumps(run_stage(args.stage, place)), flush=True)


def prepare(stage: str, place: Place, storage: Storage) -> None:
    """What a stage needs that is not part of it (not measured): the channel, the model, the captured traffic."""
    if stage == "train":
        table = read_split(storage, join_uri(place.dataset, SPLIT_FILE))
        train_channel(table, place.mirror, place.local / "train")
    elif stage in ("evaluate", "batch") and not (place.local / "model").exists():
        write_untrained_model_dir(place.local / "model", "resnet18", 32, seed=0)
    elif stage == "monitor":
        capture_traffic(storage, place.photos, place.capture, place.images)


def stages(args: argparse.Namespace) -> None:
    """Every stage over every size, each in its own process; a JSON line a (size, stage) into ``--results``."""
    import boto3

    os.environ.update(CREDENTIALS)
    root = args.scratch
    photos = root / "photos"
    run = time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    generate_photos(photos, max(args.sizes))
    print(f"{max(args.sizes)} photos ready in {photos} ({time.perf_counter() - started:.0f} s)", flush=True)
    with contextlib.ExitStack() as stack:
        if args.store == "s3":
            endpoint = stack.enter_context(LoopbackS3()).endpoint_url
            s3 = boto3.client("s3", endpoint_url=endpoint)
            for bucket in (SOURCE, WORK):
                s3.create_bucket(Bucket=bucket.removeprefix("s3://"))
            source, work = SOURCE, WORK
        else:
            endpoint, source, work = "", photos.as_uri(), (root / "store").as_uri()
        storage = Storage(endpoint or None)
        seeded = 0
        for size in sorted(args.sizes):
            if args.store == "s3":
                started = time.perf_counter()
                seed_bucket(s3, photos, seeded, size)
                seeded = size
                print(f"N={size}: bucket seeded ({time.perf_counter() - started:.0f} s)", flush=True)
            place = Place(size, photos, source, root / run / f"n{size}", join_uri(work, run, f"n{size}"))
            place.local.mkdir(parents=True)
            for stage in args.only or STAGES:
                prepare(stage, place, storage)
                command = [sys.executable, __file__, "--stage", stage, "--images", str(size), "--source", source]
                command += ["--local", str(place.local), "--work", place.work, "--scratch", str(root)]
                child = subprocess.run(
                    command, capture_output=True, text=True, env={**os.environ, "SCALE_S3": endpoint}
                )
                if child.returncode:
                    raise SystemExit(f"N={size} {stage} failed:\n{child.stderr[-3000:]}")
                row = {"store": args.store, "n": size, "stage": stage, **json.loads(child.stdout.splitlines()[-1])}
                with args.results.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(
                    f"N={size} {stage}: {row['seconds']:.1f} s, peak {row['peak_mb']:.0f} MB "
                    f"({row['peak_mb'] - row['start_mb']:.0f} above start), {row['images']} images",
                    flush=True,
                )
            subprocess.run(["rm", "-rf", str(place.local)], check=True)
            if args.store == "file":
                subprocess.run(["rm", "-rf", str(local_path(place.work))], check=True)
    report(args)


def report(args: argparse.Namespace) -> None:
    """The markdown table and the plot of ``--results`` (the last row of each size and stage)."""
    lines = map(json.loads, args.results.read_text().splitlines())
    rows = {(row["stage"], row["n"]): row for row in lines if row["store"] == args.store}
    sizes = sorted({n for _, n in rows})
    done = [stage for stage in STAGES if any((stage, n) in rows for n in sizes)]
    first, last = sizes[0], sizes[-1]
    print(
        "| stage | "
        + " | ".join(f"N={n}: s, peak MB (above start)" for n in sizes)
        + f" | {last}/{first}: time, peak |"
    )
    print("|---" * (len(sizes) + 2) + "|")
    for stage in done:
        cells = []
        for n in sizes:
            row = rows.get((stage, n))
            cells.append(
                f"{row['seconds']:.1f}, {row['peak_mb']:.0f} ({row['peak_mb'] - row['start_mb']:.0f})"
                if row
                else "not run"
            )
        a, b = rows.get((stage, first)), rows.get((stage, last))
        ratio = f"{b['seconds'] / a['seconds']:.1f}x, {b['peak_mb'] / a['peak_mb']:.2f}x" if a and b else "-"
        print(f"| {stage} | " + " | ".join(cells) + f" | {ratio} |")
    figure, (times, peaks) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in done:
        measured = [n for n in sizes if (stage, n) in rows]
        times.plot(measured, [rows[stage, n]["seconds"] for n in measured], marker="o", label=stage)
        peaks.plot(measured, [rows[stage, n]["peak_mb"] for n in measured], marker="o", label=stage)
    times.set(xscale="log", yscale="log", xlabel="images (N)", ylabel="wall time, s", title="Time per stage")
    peaks.set(xscale="log", xlabel="images (N)", ylabel="peak resident memory, MB", title="Peak memory per stage")
    peaks.set_ylim(bottom=0)
    for axis in (times, peaks):
        axis.set_xticks(sizes, [f"{n // 1000}k" for n in sizes])
        axis.minorticks_off()
    times.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=80)
    print(f"\nplot: {args.plot} ({args.plot.stat().st_size / 1000:.0f} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[5000, 20000], help="channel sizes (default: 5000 20000)"
    )
    parser.add_argument("--image-size", type=int, default=64, help="(default: 64)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="decode and torch threads; 1 is steadiest on a shared machine (default: 1)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way per N, alternated (default: 2)")
    parser.add_argument("--throughput", action="store_true", help="images/s on the ABID sample instead, old vs new")
    parser.add_argument("--sample-images", type=int, default=160, help="with --throughput (default: 160)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs a way, with --throughput (default: 3)")
    parser.add_argument(
        "--data-rounds", type=int, default=20, help="passes of the data path alone, with --throughput (default: 20)"
    )
    parser.add_argument(
        "--stages", action="store_true", help="every stage over synthetic buckets of --sizes (one process each)"
    )
    parser.add_argument("--only", nargs="+", choices=STAGES, help="with --stages: these stages only")
    parser.add_argument(
        "--store",
        choices=("s3", "file"),
        default="s3",
        help="with --stages or --report: the buckets on the loopback S3, or file:// folders (default: s3)",
    )
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "scale-stages.jsonl",
        help="with --stages: the JSON lines it appends to (default: benchmarks/results/scale-stages.jsonl)",
    )
    parser.add_argument(
        "--plot", type=Path, default=ROOT / "docs" / "img" / "scale.png", help="(default: docs/img/scale.png)"
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bincount-scale",
        help="with --stages: the photos (made once) and each run's files (default: /tmp/bincount-scale)",
    )
    parser.add_argument("--report", action="store_true", help="the table and plot of --results, running nothing")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--local", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--channel", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    elif args.stage:
        stage_child(args)
    elif args.stages:
        stages(args)
    elif args.report:
        report(args)
    elif args.throughput:
        throughput(args)
    else:
        scale(args)


if __name__ == "__main__":
    main()
