"""The optional instruments of a run: the smdebug hook (``--debugger``) and torch.profiler (``--profile``).

smdebug is imported only when the debugger is on, so a container without it trains all the same.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

SAGEMAKER_DEBUG_CONFIG = "/opt/ml/input/config/debughookconfig.json"


@dataclass
class StepTimes:
    """Seconds per training step (data wait included) and the data wait alone, one entry per step."""

    step: list[float] = field(default_factory=list)
    wait: list[float] = field(default_factory=list)


def make_debugger_hook(model: nn.Module, criterion: nn.Module, out_dir: str, save_interval: int) -> Any:
    """An smdebug hook saving losses every step, and weights and gradients of trainable parameters.

    In a SageMaker job with a DebuggerHookConfig the job's JSON config decides the output path.
    """
    import smdebug.pytorch as smd

    if os.path.exists(SAGEMAKER_DEBUG_CONFIG):
        hook = smd.Hook.create_from_json_file()
    else:
        hook = smd.Hook(
            out_dir=out_dir,
            export_tensorboard=False,
            save_config=smd.SaveConfig(save_interval=save_interval),
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


def set_hook_mode(hook: Any, mode: str) -> None:
    """Tell the smdebug hook (if any) whether steps now train (``TRAIN``) or evaluate (``EVAL``)."""
    if hook is not None:
        from smdebug import modes

        hook.set_mode(getattr(modes, mode))


def start_profiler(trace_dir: Path, steps: int, cuda: bool) -> torch.profiler.profile:
    """A started torch.profiler tracing ``steps`` training steps (after one skipped, one warm-up) into ``trace_dir``."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)),
        record_shapes=True,
        profile_memory=True,
    )
    profiler.start()
    return profiler


def top_operators(profiler: torch.profiler.profile, device: torch.device) -> list[dict[str, Any]]:
    """The ten operators that took the most self time on ``device``."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = sorted(profiler.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in averages) or 1.0
    return [
        {"name": e.key, "calls": e.count, "self_time_ms": getattr(e, key) / 1000, "share": getattr(e, key) / total}
        for e in averages[:10]
    ]


def profiler_summary(profiler: torch.profiler.profile | None, times: StepTimes, device: torch.device) -> dict[str, Any]:
    """Step time, the share of it spent waiting for data, the top operators and peak memory."""
    ordered = sorted(times.step)
    return {
        "device": str(device),
        "steps": len(times.step),
        "step_time_ms": {
            "mean": 1000 * sum(times.step) / max(len(times.step), 1),
            "p50": 1000 * ordered[len(ordered) // 2] if ordered else 0.0,
            "p90": 1000 * ordered[int(len(ordered) * 0.9)] if ordered else 0.0,
        },
        "data_wait_share": sum(times.wait) / max(sum(times.step), 1e-9),
        "peak_memory_mb": {
            "process_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_allocated": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        },
        "top_operators": top_operators(profiler, device) if profiler is not None else [],
    }
