"""Picks the implementations of the contracts for a profile: the only module that knows both backends.

    local  train.py as a subprocess, Optuna, endpoints as processes here, batch transform in-process
    aws    SageMaker training and tuning jobs, endpoints and transform jobs (SDK v2), and the
           model registry mirrored to SageMaker Model Registry

The SageMaker SDK itself is imported inside the SageMaker backends, on first use: it takes seconds.
"""

from __future__ import annotations

from bincount.config import Settings
from bincount.contracts.metrics import InvocationMetrics
from bincount.contracts.serving import ServingBackend
from bincount.contracts.training import TrainingBackend
from bincount.contracts.tuning import TuningBackend
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend
from bincount.local.training import LocalTrainingBackend
from bincount.local.tuning import LocalTuningBackend
from bincount.registry import StorageModelRegistry
from bincount.sagemaker.metrics import SageMakerInvocationMetrics
from bincount.sagemaker.model_registry import SageMakerModelRegistry
from bincount.sagemaker.serving import SageMakerServingBackend
from bincount.sagemaker.training import SageMakerTrainingBackend
from bincount.sagemaker.tuning import SageMakerTuningBackend


def get_training_backend(settings: Settings) -> TrainingBackend:
    if settings.profile == "aws":
        return SageMakerTrainingBackend(settings)
    return LocalTrainingBackend(settings)


def get_tuning_backend(settings: Settings) -> TuningBackend:
    if settings.profile == "aws":
        return SageMakerTuningBackend(settings)
    return LocalTuningBackend()


def get_serving_backend(
    settings: Settings, run_key: str = "", host_options: HostOptions | None = None
) -> ServingBackend:
    """``run_key`` (the flow run) keeps SageMaker's transform job names unique per run; ``host_options``
    tune the local model hosts (batching, threads)."""
    if settings.profile == "aws":
        return SageMakerServingBackend(settings, run_key=run_key)
    return LocalServingBackend(settings, host_options=host_options)


def get_model_registry(settings: Settings) -> StorageModelRegistry:
    """The registry under the artifact root (both profiles); on ``aws`` each version is mirrored to SageMaker."""
    return StorageModelRegistry.from_settings(
        settings, mirror=SageMakerModelRegistry(settings) if settings.profile == "aws" else None
    )


def get_invocation_metrics(settings: Settings) -> InvocationMetrics | None:
    """The platform's invocation and error counts (``aws``: CloudWatch); None on ``local``, whose capture
    records carry each answer's status themselves."""
    if settings.profile == "aws":
        return SageMakerInvocationMetrics(settings)
    return None
