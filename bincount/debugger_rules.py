"""The project's own debugger rules: checks on smdebug output with the meaning of SageMaker Debugger's built-in rules.

Both backends run them on what train.py's smdebug hook saved: the local backend on the job's
``debug-output`` (:func:`check_job_rules`), the SageMaker backend on the ``tensors/`` folder inside the
job's ``output.tar.gz`` (:func:`check_archive_rules`), so neither needs SageMaker's Debugger service.

Each rule reads the tensors a job saved (``smdebug.trials``) and reports ``passed`` or ``fired``
with its evidence, with the thresholds SageMaker's rules get too
(:data:`bincount.contracts.training.DEBUGGER_RULES`). Training and evaluation losses are grouped into
phases (one run of consecutive steps in the same mode, i.e. one epoch's training or evaluation), the way
the built-in rules compare TRAIN and EVAL losses.

| rule                       | fires when                                                                  |
|----------------------------|-----------------------------------------------------------------------------|
| loss_not_decreasing        | a loss is not finite, or the mean training loss over the last ``num_steps`` |
|                            | steps is not ``diff_percent`` % below that of the first ``num_steps``       |
| overfit                    | (eval - train) / train loss exceeds ``ratio_threshold`` for ``patience``    |
|                            | epochs in a row, after the first :data:`WARMUP_EPOCHS` (not evaluated when  |
|                            | a loss is not finite: loss_not_decreasing reports that)                     |
| overtraining               | the eval loss has not improved by ``delta`` for ``patience_validation``     |
|                            | epochs while the training loss kept falling                                 |
| vanishing_gradient         | a gradient's mean absolute value falls below ``threshold``                  |
| poor_weight_initialization | in the first saved weights, a layer's values span less than                 |
|                            | ``distribution_range``, or a layer's gain var(W)·max(fan_in, fan_out) lies  |
|                            | outside [1/``threshold``, ``threshold``] or the gains differ by more than   |
|                            | ``threshold`` times (the built-in rule's activation-variance test, read     |
|                            | from the weights: a well-initialized net keeps the gain near 1-2)           |
"""

from __future__ import annotations

import itertools
import math
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bincount.contracts.training import DEBUGGER_RULES, RuleResult
from bincount.storage import Storage

ARCHIVE_TENSORS = "tensors"
"""The folder of ``output.tar.gz`` (``SM_OUTPUT_DATA_DIR`` packed) that holds a SageMaker job's smdebug tensors."""

WARMUP_EPOCHS = 2
"""Epochs the overfit check leaves out: an untrained network's first evaluation (batch-norm statistics
still settling) can be many times its training loss on a healthy run, so a rule that counted it would
fire on every run and teach users to ignore it. SageMaker's own rule is configured in steps (its
``start_step``), and is left at its default."""


def _phases(trial: Any) -> list[tuple[str, list[float]]]:
    """Losses grouped into consecutive same-mode phases: ``[("TRAIN", [...]), ("EVAL", [...]), ...]``."""
    names = trial.tensor_names(collection="losses")
    if not names:
        return []
    tensor = trial.tensor(names[0])
    phases: list[tuple[str, list[float]]] = []
    for step in sorted(tensor.steps()):
        mode, _ = trial.mode_modestep(step)
        value = float(np.asarray(tensor.value(step)).mean())
        if phases and phases[-1][0] == mode.name:
            phases[-1][1].append(value)
        else:
            phases.append((mode.name, [value]))
    return phases


def _epoch_losses(phases: list[tuple[str, list[float]]]) -> list[tuple[float, float]]:
    """(train mean, eval mean) per epoch: each TRAIN phase paired with the EVAL phase after it."""
    pairs = []
    for (mode, values), (next_mode, next_values) in itertools.pairwise(phases):
        if mode == "TRAIN" and next_mode == "EVAL":
            pairs.append((float(np.mean(values)), float(np.mean(next_values))))
    return pairs


def loss_not_decreasing(phases: list[tuple[str, list[float]]], num_steps: int, diff_percent: float) -> RuleResult:
    losses = [v for mode, values in phases if mode == "TRAIN" for v in values]
    if len(losses) < 2:
        return RuleResult("loss_not_decreasing", "not_evaluated", f"{len(losses)} training loss values saved; need 2")
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        return RuleResult(
            "loss_not_decreasing", "fired", f"training loss is not finite from step {bad[0]} ({losses[bad[0]]})"
        )
    window = max(1, min(num_steps, len(losses) // 2))
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    drop = 100 * (first - last) / abs(first) if first else 0.0
    evidence = (
        f"mean training loss of the first {window} steps {first:.4g}, of the last {window} {last:.4g} "
        f"({drop:+.1f}% drop)"
    )
    return RuleResult("loss_not_decreasing", "fired" if drop < diff_percent else "passed", evidence)


def overfit(
    phases: list[tuple[str, list[float]]], ratio_threshold: float, patience: int, warmup_epochs: int = WARMUP_EPOCHS
) -> RuleResult:
    pairs = _epoch_losses(phases)
    if not pairs:
        return RuleResult("overfit", "not_evaluated", "no evaluation losses saved")
    broken = [epoch for epoch, pair in enumerate(pairs, start=1) if not all(map(math.isfinite, pair))]
    if broken:
        return RuleResult(
            "overfit", "not_evaluated", f"losses not finite from epoch {broken[0]} (see loss_not_decreasing)"
        )
    checked = pairs[warmup_epochs:]
    if not checked:
        return RuleResult("overfit", "not_evaluated", f"{len(pairs)} epochs evaluated, all warm-up ({warmup_epochs})")
    run = 0
    for epoch, (train, evaluation) in enumerate(checked, start=warmup_epochs + 1):
        ratio = (evaluation - train) / abs(train) if train else math.inf
        run = run + 1 if ratio > ratio_threshold else 0
        if run >= patience:
            return RuleResult(
                "overfit",
                "fired",
                f"epoch {epoch}: eval loss {evaluation:.3g} vs train loss {train:.3g} "
                f"(gap {100 * ratio:.0f}% > {100 * ratio_threshold:.0f}% for {run} epochs)",
            )
    last_train, last_eval = pairs[-1]
    return RuleResult(
        "overfit",
        "passed",
        f"eval/train loss gap within {100 * ratio_threshold:.0f}% after {warmup_epochs} warm-up epoch(s) "
        f"(last eval loss {last_eval:.3g} vs train loss {last_train:.3g})",
    )


def overtraining(phases: list[tuple[str, list[float]]], patience_validation: int, delta: float) -> RuleResult:
    pairs = _epoch_losses(phases)
    if len(pairs) <= patience_validation:
        return RuleResult(
            "overtraining", "not_evaluated", f"{len(pairs)} epochs evaluated; need more than {patience_validation}"
        )
    evals = [e for _, e in pairs]
    best_epoch = int(np.argmin(evals))
    since = len(pairs) - 1 - best_epoch
    later_best = min(evals[best_epoch + 1 :], default=math.inf)
    stalled = since >= patience_validation and later_best > evals[best_epoch] * (1 - delta)
    train_falling = pairs[-1][0] < pairs[best_epoch][0]
    evidence = (
        f"eval loss best at epoch {best_epoch + 1} ({evals[best_epoch]:.4g}), {since} epochs since; "
        f"train loss {pairs[best_epoch][0]:.4g} -> {pairs[-1][0]:.4g}"
    )
    return RuleResult("overtraining", "fired" if stalled and train_falling else "passed", evidence)


def vanishing_gradient(trial: Any, threshold: float) -> RuleResult:
    names = trial.tensor_names(collection="gradients")
    if not names:
        return RuleResult("vanishing_gradient", "not_evaluated", "no gradients saved")
    smallest = (math.inf, "", -1)
    for name in names:
        tensor = trial.tensor(name)
        for step in tensor.steps():
            value = float(np.abs(np.asarray(tensor.value(step))).mean())
            if value < smallest[0]:
                smallest = (value, name, step)
    evidence = (
        f"smallest mean |gradient| {smallest[0]:.3g} ({smallest[1]}, step {smallest[2]}) over {len(names)} tensors"
    )
    return RuleResult("vanishing_gradient", "fired" if smallest[0] < threshold else "passed", evidence)


def poor_weight_initialization(trial: Any, threshold: float, distribution_range: float) -> RuleResult:
    names = [n for n in trial.tensor_names(collection="weights") if n.endswith(".weight")]
    gains: dict[str, float] = {}
    for name in names:
        tensor = trial.tensor(name)
        steps = tensor.steps()
        if not steps:
            continue
        value = np.asarray(tensor.value(min(steps)), dtype=np.float64)
        if value.ndim < 2:  # normalization scales, not layer weights
            continue
        spread = float(value.max() - value.min())
        if spread < distribution_range:
            return RuleResult(
                "poor_weight_initialization", "fired", f"{name} spans only {spread:.3g} (< {distribution_range})"
            )
        fan_in, fan_out = value.size / value.shape[0], value.size / value.shape[1]
        gains[name] = float(value.var() * max(fan_in, fan_out))
    if len(gains) < 2:
        return RuleResult("poor_weight_initialization", "not_evaluated", f"{len(gains)} layer weights saved; need 2")
    low, high = min(gains, key=gains.get), max(gains, key=gains.get)
    ratio = gains[high] / gains[low] if gains[low] else math.inf
    evidence = f"gain var(W)·fan from {gains[low]:.3g} ({low}) to {gains[high]:.3g} ({high}): ratio {ratio:.1f}"
    poor = ratio > threshold or gains[low] < 1 / threshold or gains[high] > threshold
    return RuleResult("poor_weight_initialization", "fired" if poor else "passed", evidence)


def check_rules(debug_dir: Path) -> list[RuleResult]:
    """Every rule on the smdebug output in ``debug_dir``."""
    os.environ.setdefault("SMDEBUG_LOG_LEVEL", "warning")  # else its INFO lines go to stdout, past every logger
    from smdebug.trials import create_trial

    trial = create_trial(str(debug_dir))
    phases = _phases(trial)
    return [
        loss_not_decreasing(phases, **DEBUGGER_RULES["loss_not_decreasing"]),
        overfit(phases, **DEBUGGER_RULES["overfit"]),
        overtraining(phases, **DEBUGGER_RULES["overtraining"]),
        vanishing_gradient(trial, **DEBUGGER_RULES["vanishing_gradient"]),
        poor_weight_initialization(trial, **DEBUGGER_RULES["poor_weight_initialization"]),
    ]


def check_job_rules(storage: Storage, debug_output_uri: str) -> list[RuleResult]:
    """:func:`check_rules` on a job's ``debug-output`` URI (an ``s3://`` one is copied locally first)."""
    with tempfile.TemporaryDirectory(prefix="debug-output-") as scratch:
        return check_rules(storage.local_folder(debug_output_uri, Path(scratch)))


def check_archive_rules(storage: Storage, output_uri: str, job_name: str) -> list[RuleResult]:
    """:func:`check_rules` on the ``tensors/`` folder inside a job's ``output.tar.gz`` at ``output_uri``.

    Raises:
        ValueError: the archive holds no tensors (the job ran without the debugger, or train.py wrote them
            elsewhere); the message says how to run it with them.
    """
    with tempfile.TemporaryDirectory(prefix="job-output-") as scratch:
        archive_path = Path(scratch) / "output.tar.gz"
        storage.download_file(output_uri, archive_path)
        with tarfile.open(archive_path, mode="r:gz") as archive:
            members = [m for m in archive.getmembers() if Path(m.name).parts[:1] == (ARCHIVE_TENSORS,)]
            if not any(member.isfile() for member in members):
                raise ValueError(
                    f"{output_uri} holds no {ARCHIVE_TENSORS}/ folder: job {job_name} saved no debugger tensors. "
                    "Train with debugger=True (train.py's --debugger writes them under SM_OUTPUT_DATA_DIR)"
                )
            archive.extractall(scratch, members=members, filter="data")
        return check_rules(Path(scratch) / ARCHIVE_TENSORS)
