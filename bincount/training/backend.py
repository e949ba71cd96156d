"""The training backend seam: one Protocol, chosen by ``settings.profile``.

``local`` runs train.py as a subprocess on this machine; a ``sagemaker`` backend (an Estimator per
job, same spec and record) plugs in here for the ``aws`` profile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from bincount.config import Settings
from bincount.training.debugger import RuleResult
from bincount.training.jobs import TrainingJob, TrainingJobSpec

LogSink = Callable[[str], None]
StopCheck = Callable[[list[dict[str, float]]], bool]
"""Given the epochs' metrics so far, True stops the job early (status ``Stopped``)."""


class TrainingBackend(Protocol):
    def train(
        self, spec: TrainingJobSpec, on_log: LogSink | None = None, should_stop: StopCheck | None = None
    ) -> TrainingJob:
        """Run a training job to its end; raise :class:`TrainingJobFailed` if it fails."""
        ...

    def rule_results(self, job: TrainingJob, on_event: LogSink | None = None) -> list[RuleResult]:
        """The debugger rules' verdicts on ``job`` (run with ``debugger=True``), named alike on every backend."""
        ...


def get_training_backend(settings: Settings) -> TrainingBackend:
    """The backend for ``settings.profile``."""
    if settings.profile == "local":
        from bincount.training.local import LocalTrainingBackend

        return LocalTrainingBackend(settings)
    if settings.profile == "aws":
        from bincount.sagemaker.training import SageMakerTrainingBackend

        return SageMakerTrainingBackend(settings)
    raise NotImplementedError(
        f"profile {settings.profile!r} has no training backend yet: use profile 'local' (BINCOUNT_PROFILE=local)"
    )
