"""The error of a training run that cannot go on: train.py exits 2 and writes its message to ``output/failure``."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and how to fix it."""
