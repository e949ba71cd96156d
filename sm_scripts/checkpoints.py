"""Checkpoints: what a run needs to go on exactly where it stopped (managed spot training, retries).

``checkpoint.pt`` holds one dict of tensors and plain values (docs/CONTRACTS.md), so
``torch.load(path, weights_only=True)`` reads it; a run resumes only its own checkpoint, told by
the fingerprint of the flags that decide what it computes.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from sm_scripts.errors import TrainingError

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
    """Write ``checkpoint.pt`` atomically (a synced temp file renamed over the last one): a kill mid-write
    loses nothing."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / CHECKPOINT_FILE
    temporary = checkpoint_dir / f".tmp-{CHECKPOINT_FILE}"
    with temporary.open("wb") as handle:
        torch.save(checkpoint, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


def fingerprint_differences(written: dict[str, Any], fingerprint: dict[str, Any]) -> list[str]:
    """``--flag <there> there, <now> now`` for each flag whose value differs."""
    return [
        f"--{name} {written.get(name, '(unset)')} there, {fingerprint.get(name, '(unset)')} now"
        for name in sorted(set(written) | set(fingerprint))
        if written.get(name) != fingerprint.get(name)
    ]


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
    differences = fingerprint_differences(checkpoint["fingerprint"], fingerprint)
    if differences:
        raise TrainingError(
            f"checkpoint {path} belongs to a run with other hyperparameters ({'; '.join(differences)}), and resuming "
            "it would mix two runs: give this run a fresh --checkpoint-dir (or delete that checkpoint) to train from "
            "scratch, or pass the checkpoint's hyperparameters to resume it"
        )
    return checkpoint
