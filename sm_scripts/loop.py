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
from sm_scripts.distributed import SINGLE, Cluster, sum_over_processes
from sm_scripts.monitoring import StepTimes, set_hook_mode
from sm_scripts.networks import head_name, predict_classes

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


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
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Batches,
    device: torch.device,
    amp: bool,
    times: StepTimes,
    hook: Any = None,
    profiler: torch.profiler.profile | None = None,
    log_interval: int = 0,
    cluster: Cluster = SINGLE,
    decoding: str = "mode",
) -> tuple[float, float, float]:
    """One pass over the training data; returns (mean loss, accuracy, images per second), over every
    process's batches in a data-parallel run."""
    model.train()
    set_hook_mode(hook, "TRAIN")
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for step, (images, labels, tick, waited) in enumerate(timed(data, device), start=1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
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
        if profiler is not None:
            profiler.step()
    elapsed = time.perf_counter() - start
    total_loss, correct, seen = sum_over_processes([total_loss, correct, seen], device, cluster)
    return total_loss / max(seen, 1), correct / max(seen, 1), seen / max(elapsed, 1e-9)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    data: Batches,
    device: torch.device,
    amp: bool,
    class_values: torch.Tensor,
    hook: Any = None,
    cluster: Cluster = SINGLE,
    decoding: str = "mode",
    scored_classes: torch.Tensor | None = None,
) -> tuple[float, float, float]:
    """Mean loss, accuracy and RMSE of the predicted count (over every process's part in a data-parallel run);
    with ``scored_classes``, predicted among those classes alone (their probabilities renormalized)."""
    model.eval()
    set_hook_mode(hook, "EVAL")
    total_loss, correct, squared, seen = 0.0, 0, 0.0, 0
    for images, labels in data:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = model(images)
            loss = criterion(outputs, labels)
        predicted = predict_classes(outputs, decoding, scored_classes)
        total_loss += loss.item() * labels.shape[0]
        correct += (predicted == labels).sum().item()
        squared += ((class_values[predicted] - class_values[labels]) ** 2).sum().item()
        seen += labels.shape[0]
    total_loss, correct, squared, seen = sum_over_processes([total_loss, correct, squared, seen], device, cluster)
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
