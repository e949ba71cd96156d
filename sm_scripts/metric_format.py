"""The one format train.py prints its metrics in, and the regexes that read it back.

Both tuners read the same lines: SageMaker's HyperparameterTuner through ``METRIC_DEFINITIONS``
(its ``metric_definitions`` argument), and the local backend through :func:`parse_metrics`.
A line looks like this (one line, wrapped here)::

    epoch: 3 train_loss: 1.2345 train_acc: 0.4012 eval_loss: 1.4410 eval_acc: 0.3550
        eval_rmse: 1.0817 lr: 0.01 train_ips: 312.4

Self-contained (stdlib only): SageMaker ships sm_scripts/ alone.
"""

from __future__ import annotations

import re

NUMBER = r"([-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf))"

EPOCH_FIELDS: tuple[str, ...] = (
    "epoch",
    "train_loss",
    "train_acc",
    "eval_loss",
    "eval_acc",
    "eval_rmse",
    "lr",
    "train_ips",
)
"""Fields of an epoch line, in print order."""

METRIC_NAMES: dict[str, str] = {
    "epoch": "epoch",
    "train_loss": "train:loss",
    "train_acc": "train:accuracy",
    "eval_loss": "eval:loss",
    "eval_acc": "eval:accuracy",
    "eval_rmse": "eval:rmse",
    "lr": "train:lr",
    "train_ips": "train:images_per_second",
}
"""Printed field -> metric name (SageMaker allows letters, digits, ``:`` and ``_``)."""

OBJECTIVE_METRIC = "eval:accuracy"
OBJECTIVE_TYPE = "Maximize"

METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": name, "Regex": rf"\b{field}: {NUMBER}"} for field, name in METRIC_NAMES.items()
]
"""SageMaker ``metric_definitions``: ``[{"Name": ..., "Regex": ...}]``, one capture group each."""

_PATTERNS = [(definition["Name"], re.compile(definition["Regex"])) for definition in METRIC_DEFINITIONS]


def format_epoch_line(values: dict[str, float]) -> str:
    """The epoch line for ``values`` (every name in ``EPOCH_FIELDS``)."""
    missing = [name for name in EPOCH_FIELDS if name not in values]
    if missing:
        raise KeyError(f"an epoch line needs {', '.join(missing)}")
    parts = []
    for name in EPOCH_FIELDS:
        value = values[name]
        if name == "epoch":
            parts.append(f"epoch: {int(value)}")
        elif name == "lr":
            parts.append(f"lr: {value:.6g}")
        elif name == "train_ips":
            parts.append(f"train_ips: {value:.1f}")
        else:
            parts.append(f"{name}: {value:.4f}")
    return " ".join(parts)


def parse_metrics(line: str) -> dict[str, float]:
    """Metric name -> value for every metric regex that matches ``line`` (empty if none)."""
    found = {}
    for name, pattern in _PATTERNS:
        match = pattern.search(line)
        if match:
            found[name] = float(match.group(1))
    return found
