"""The training loop's parts: one epoch of training, one evaluation, and the record of the epochs so far."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sm_scripts.data import ImageCache, batches
from sm_scripts.distributed import Cluster, sum_over_processes, unwrap
from sm_scripts.monitoring import StepTimes, set_hook_mode
from sm_scripts.networks import head_name, predict_classes

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Runtime:
    """Where the run computes: the device, mixed precision on or off, CPU threads, and this process's
    place among data-parallel processes (``sm_scripts/distributed.py``)."""

    device: torch.device
    amp: bool
    threads: int
    cluster: Cluster


@dataclass
class Data:
    """The class folders' names, each class's count, the cached images to fit on and to score, and the
    classes scored: those the scored channel holds (a model trained on counts 0 and 6+ as well is kept
    for its accuracy on the counts 1-5 that valid holds), or None for all."""

    classes: list[str]
    class_values: torch.Tensor
    train: ImageCache
    eval: ImageCache
    scored_classes: torch.Tensor | None = None


@dataclass
class Training:
    """What the epochs run: ``model`` holds the weights; ``trained`` is what each step calls (the model,
    its compiled wrapper, or the head alone on cached backbone features)."""

    model: nn.Module
    trained: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator
    mean: torch.Tensor
    std: torch.Tensor
    hook: Any = None
    profiler: torch.profiler.profile | None = None


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


@dataclass
class Progress:
    """The epochs so far: one metrics dict each, the kept epoch (metrics, and weights as ``state``),
    and how many epochs have passed without improvement (``stale``)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(
        default_factory=lambda: {"epoch": 0, "eval_acc": -1.0, "eval_loss": math.inf, "state": None}
    )
    stale: int = 0

    def record(self, values: dict[str, float], model: nn.Module, keep: str) -> None:
        """Add an epoch's metrics; keep its weights if ``keep`` is ``last`` or it beats the kept epoch."""
        self.history.append(values)
        best = self.best
        improved = values["eval_acc"] > best["eval_acc"] or (
            values["eval_acc"] == best["eval_acc"] and values["eval_loss"] < best["eval_loss"]
        )
        if keep == "last" or improved:
            self.best = {**values, "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
        self.stale = 0 if improved else self.stale + 1


def timed(data: Batches, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, float, float]]:
    """Each batch with the time it was asked for and how long it took to come (the data wait)."""
    while True:
        tick = time.perf_counter()
        batch = next(data, None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        waited = time.perf_counter() - tick
        if batch is None:
            return
        yield batch[0], batch[1], tick, waited


def train_one_epoch(
    training: Training,
    runtime: Runtime,
    data: Batches,
    times: StepTimes,
    *,
    log_interval: int = 0,
    decoding: str = "mode",
) -> tuple[float, float, float]:
    """One pass over the training data with ``training.trained``; returns (mean loss, accuracy, images per
    second), over every process's batches in a data-parallel run."""
    model, criterion, optimizer, device = training.trained, training.criterion, training.optimizer, runtime.device
    model.train()
    set_hook_mode(training.hook, "TRAIN")
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for step, (images, labels, tick, waited) in enumerate(timed(data, device), start=1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=runtime.amp):
            outputs = model(images)
            loss = criterion(outputs, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch_loss = loss.item()  # syncs with the device, so step time is real
        if not math.isfinite(batch_loss):
            print(f"non-finite training loss {batch_loss} at step {len(times.step) + 1}", flush=True)
        total_loss += batch_loss * labels.shape[0]
        correct += (predict_classes(outputs.detach(), decoding) == labels).sum().item()
        seen += labels.shape[0]
        times.step.append(time.perf_counter() - tick)
        times.wait.append(waited)
        if log_interval and step % log_interval == 0:
            speed = seen / (time.perf_counter() - start)
            print(f"  step {step}: loss {batch_loss:.4f}, {speed:.1f} images/s", flush=True)
        if training.profiler is not None:
            training.profiler.step()
    elapsed = time.perf_counter() - start
    total_loss, correct, seen = sum_over_processes([total_loss, correct, seen], device, runtime.cluster)
    return total_loss / max(seen, 1), correct / max(seen, 1), seen / max(elapsed, 1e-9)


@torch.inference_mode()
def evaluate(
    training: Training, runtime: Runtime, data: Batches, scored: Data, *, decoding: str = "mode"
) -> tuple[float, float, float]:
    """Mean loss, accuracy and RMSE of the predicted count of ``training``'s model (unwrapped from its data-parallel
    wrapper; over every process's part in a data-parallel run); with ``scored.scored_classes``, predicted among
    those classes alone (their probabilities renormalized)."""
    model, criterion, device = unwrap(training.trained), training.criterion, runtime.device
    class_values, scored_classes = scored.class_values, scored.scored_classes
    model.eval()
    set_hook_mode(training.hook, "EVAL")
    total_loss, correct, squared, seen = 0.0, 0, 0.0, 0
    for images, labels in data:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=runtime.amp):
            outputs = model(images)
            loss = criterion(outputs, labels)
        predicted = predict_classes(outputs, decoding, scored_classes)
        total_loss += loss.item() * labels.shape[0]
        correct += (predicted == labels).sum().item()
        squared += ((class_values[predicted] - class_values[labels]) ** 2).sum().item()
        seen += labels.shape[0]
    total_loss, correct, squared, seen = sum_over_processes(
        [total_loss, correct, squared, seen], device, runtime.cluster
    )
    return total_loss / seen, correct / seen, math.sqrt(squared / seen)


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
