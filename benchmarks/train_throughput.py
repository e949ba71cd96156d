"""Training throughput (images/s): train.py's data path and model layout against the seeds' way.

Same images, same network and initial weights, same optimizer and batch size, run side by side in
one process, epochs interleaved (this machine is shared and noisy):

- seeds' way: ``ImageFolder`` + PIL decode, ``Resize``, ``RandomHorizontalFlip``, ``ToTensor``,
  ``Normalize`` every epoch in a ``DataLoader`` (``num_workers=0``), NCHW, fp32;
- train.py's way: its modules' functions (``load_channel`` decodes and resizes once into a uint8 cache,
  ``batches`` slices, flips and normalizes on tensors, channels_last), and with ``--compile`` its
  ``torch.compile`` (compiled during the untimed warm-up epoch);
- the compute bound: train.py's model and step on one ready-made batch, over and over (no data path
  at all). No data path can beat it, so ``bound / seeds`` is the most any data-side change can give.

    .venv/bin/python benchmarks/train_throughput.py                     # resnet18, 224 px, 192 images
    .venv/bin/python benchmarks/train_throughput.py --compile                 # train.py --compile true
    .venv/bin/python benchmarks/train_throughput.py --arch resnet50 --images 2048 --batch-size 128  # on a GPU

On a GPU both sides run there (the seeds' way fp32, train.py with its default bf16 autocast); the
seeds' loader still decodes on the CPU, as theirs did.

Measured on the 2-core CPU (shared, noisy), 125-190 real photos, batch 32, medians of 3 epochs:
resnet18 224 px 1.28x (10.1 -> 12.9 images/s), with --compile 1.16x; resnet18 112 px 1.15x. On a
quiet machine (``--images 160``): seeds' way 13.0, train.py 15.1, compute bound 15.2 images/s, so
train.py's data path costs nothing measurable and the ceiling for any data path is 1.17x here: the
1.5x target cannot be reached on this CPU without changing the model's arithmetic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sm_scripts.data import batches, find_classes, load_channel
from sm_scripts.distributed import SINGLE
from sm_scripts.loop import Runtime, Training, train_one_epoch
from sm_scripts.monitoring import StepTimes
from sm_scripts.networks import IMAGENET_MEAN, IMAGENET_STD, build_model, prepare_model
from sm_scripts.preprocessing import channel_values

ABID = ROOT.parent / "shared" / "data" / "abid"


def image_folder(root: Path, images: int) -> Path:
    """An ImageFolder of ``images`` real ABID photos (symlinks), or demo photos when the sample is absent."""
    manifest_path = ABID / "file_list.sample.json"
    if not manifest_path.is_file():
        from bincount.demo_data import write_demo_channels

        print(f"(the ABID sample is not at {ABID}: using synthetic photos)")
        return write_demo_channels(root, per_class=max(1, images // 5), size=224)["train"]
    manifest = json.loads(manifest_path.read_text())
    per_class = images // len(manifest)
    for count, paths in manifest.items():
        for path in paths[:per_class]:
            image_id = Path(path).stem
            link = root / "train" / count / f"{image_id}.jpg"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(ABID / "bucket" / "bin-images" / f"{image_id}.jpg")
    return root / "train"


def seeds_epoch(
    model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer, device: torch.device
) -> float:
    """One epoch the seeds' way (fp32, NCHW); returns images per second."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    seen, start = 0, time.perf_counter()
    for images, labels in loader:
        optimizer.zero_grad()
        loss = criterion(model(images.to(device)), labels.to(device))
        loss.backward()
        optimizer.step()
        seen += labels.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", help="(default: resnet18)")
    parser.add_argument("--image-size", type=int, default=224, help="(default: 224)")
    parser.add_argument("--images", type=int, default=192, help="images per epoch (default: 192)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per side, after one warm-up (default: 3)")
    parser.add_argument("--compile", action="store_true", help="train.py's --compile true (compiled in the warm-up)")
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="throughput-") as scratch:
        folder = image_folder(Path(scratch), args.images)
        classes = find_classes(folder)

        seeds_transform = transforms.Compose(
            [
                transforms.Resize((args.image_size, args.image_size)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        dataset = torchvision.datasets.ImageFolder(str(folder), transform=seeds_transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0)
        seeds_model = build_model(args.arch, len(classes))
        ours_model = build_model(args.arch, len(classes))
        ours_model.load_state_dict(seeds_model.state_dict())
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        amp = device.type == "cuda"  # train.py's default: bf16 autocast on a GPU, fp32 on a CPU
        seeds_model.to(device)
        ours_forward = prepare_model(ours_model, device, args.compile)

        start = time.perf_counter()
        cache = load_channel(folder, classes, args.image_size, threads=torch.get_num_threads())
        cache_s = time.perf_counter() - start
        seeds_optimizer = torch.optim.SGD(seeds_model.parameters(), lr=0.01, momentum=0.9)
        ours_optimizer = torch.optim.SGD(ours_model.parameters(), lr=0.01, momentum=0.9)
        mean, std = channel_values(IMAGENET_MEAN, device), channel_values(IMAGENET_STD, device)
        generator = torch.Generator().manual_seed(0)
        criterion = nn.CrossEntropyLoss()
        ours_training = Training(
            ours_model, ours_forward, criterion, ours_optimizer, scheduler=None, generator=generator, mean=mean, std=std
        )
        runtime = Runtime(device, amp, torch.get_num_threads(), SINGLE)

        def ours_epoch() -> float:
            data = batches(
                cache, args.batch_size, device, mean, std, True, augmentation="flip", generator=generator, min_batch=2
            )
            return train_one_epoch(ours_training, runtime, data, StepTimes())[2]

        ready = next(batches(cache, args.batch_size, device, mean, std, False))

        def bound_epoch() -> float:
            data = iter([ready] * (len(cache) // args.batch_size))
            return train_one_epoch(ours_training, runtime, data, StepTimes())[2]

        print(
            f"{args.arch} at {args.image_size}px, {len(dataset)} images, batch {args.batch_size}, "
            f"on {device} ({torch.get_num_threads()} CPU threads), train.py amp {amp}, compile {args.compile}; "
            f"train.py's cache built in {cache_s:.1f}s",
            flush=True,
        )
        seeds_epoch(seeds_model, loader, seeds_optimizer, device)  # warm-up: allocator, oneDNN kernels, compilation
        start = time.perf_counter()
        ours_epoch()
        print(f"warm-up epoch of train.py took {time.perf_counter() - start:.1f}s", flush=True)
        seeds, ours, bound = [], [], []
        for epoch in range(1, args.epochs + 1):
            seeds.append(seeds_epoch(seeds_model, loader, seeds_optimizer, device))
            ours.append(ours_epoch())
            bound.append(bound_epoch())
            print(
                f"epoch {epoch}: seeds' way {seeds[-1]:.1f} images/s, train.py {ours[-1]:.1f} images/s, "
                f"compute bound {bound[-1]:.1f} images/s",
                flush=True,
            )

    seeds_ips, ours_ips, bound_ips = statistics.median(seeds), statistics.median(ours), statistics.median(bound)
    epoch_images = len(dataset)
    with_cache = epoch_images * args.epochs / (epoch_images * args.epochs / ours_ips + cache_s)
    print(f"\nmedian images/s: seeds' way {seeds_ips:.1f}, train.py {ours_ips:.1f}: ratio {ours_ips / seeds_ips:.2f}x")
    print(
        f"compute bound {bound_ips:.1f} images/s: ratio {bound_ips / seeds_ips:.2f}x "
        f"(the most a data path can give); train.py reaches {ours_ips / bound_ips:.0%} of it"
    )
    print(
        f"counting the one-time cache over {args.epochs} epochs: train.py {with_cache:.1f} images/s, "
        f"ratio {with_cache / seeds_ips:.2f}x"
    )


if __name__ == "__main__":
    main()
