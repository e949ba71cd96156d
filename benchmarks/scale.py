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

    nice .venv/bin/python benchmarks/scale.py                         # N = 5000, 20000 at 64 px
    nice .venv/bin/python benchmarks/scale.py --sizes 5000 20000 80000
    nice .venv/bin/python benchmarks/scale.py --throughput            # old vs new images/s on the sample
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sm_scripts.data import ImageCache, batches, channel_files, find_classes, load_channel
from sm_scripts.loop import train_one_epoch
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
    epochs = []
    for epoch in range(2):  # the faster of two: this machine is shared
        data = batches(cache, 64, torch.device("cpu"), mean, std, True, "flip", torch.Generator().manual_seed(epoch), 2)
        start = time.perf_counter()
        train_one_epoch(network, nn.CrossEntropyLoss(), optimizer, data, torch.device("cpu"), False, StepTimes())
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
                for _ in batches(caches[way], 32, device, mean, std, True, "flip", generator, 2):
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
        for epoch in range(args.epochs + 1):  # epoch 0: warm-up, untimed
            for way in ("old", "new") if epoch % 2 else ("new", "old"):  # alternated: neither always goes first
                data = batches(
                    caches[way], 32, device, mean, std, True, "flip", torch.Generator().manual_seed(epoch), 2
                )
                ips = train_one_epoch(
                    models[way], nn.CrossEntropyLoss(), optimizers[way], data, device, False, StepTimes()
                )[2]
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
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--channel", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    elif args.throughput:
        throughput(args)
    else:
        scale(args)


if __name__ == "__main__":
    main()
