"""Hyperparameter tuning as one SageMaker tuning job, behind a small seam of its own.

Locally, tuning is an ask/tell loop the flow drives (:class:`bincount.training.tuning.LocalTuner`,
one task run per trial). On SageMaker the service runs the whole search: one
``HyperparameterTuner`` job (Bayesian, ``max_jobs``, ``max_parallel_jobs``, early stopping) over
the shared search space, the metric definitions from ``sm_scripts/metric_format.py``, and the
best hyperparameters read back from the tuning job. :class:`TuningBackend` is that seam; the tune
task selects it with :func:`get_tuning_backend` when ``settings.profile == "aws"``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from botocore.exceptions import ClientError

from bincount.config import Settings
from bincount.sagemaker.naming import check_name
from bincount.sagemaker.session import SageMakerBackendBase, SageMakerOptions
from bincount.sagemaker.training import SageMakerTrainingBackend
from bincount.sagemaker.waiting import TUNING_JOB, EventSink, SageMakerJobFailed, describe_or_none, wait_for
from bincount.training.jobs import TrainingJobSpec
from bincount.training.search_space import Categorical, Continuous, Integer, Parameter, sagemaker_ranges
from bincount.training.tuning import TrialResult
from sm_scripts.metric_format import METRIC_DEFINITIONS, OBJECTIVE_METRIC, OBJECTIVE_TYPE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuningSpec:
    """A tuning job: ``name`` (32 characters at most), the space, fixed hyperparameters and channels."""

    name: str
    space: tuple[Parameter, ...]
    static_hyperparameters: dict[str, Any]
    channels: dict[str, str]
    output_uri: str
    max_jobs: int
    max_parallel_jobs: int
    early_stopping: Literal["Auto", "Off"] = "Auto"
    objective_metric: str = OBJECTIVE_METRIC
    objective_type: Literal["Maximize", "Minimize"] = OBJECTIVE_TYPE  # type: ignore[assignment]


@dataclass
class TuningResult:
    """What a finished tuning job found; ``best_hyperparameters`` = static + tuned, typed as the space says."""

    name: str
    status: str
    best_training_job: str
    best_hyperparameters: dict[str, Any]
    best_objective: float | None
    best_model_uri: str | None
    trials: list[TrialResult] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TuningBackend(Protocol):
    def tune(self, spec: TuningSpec, on_event: EventSink | None = None) -> TuningResult:
        """Run (or follow) the tuning job ``spec.name`` to its end; raise if no trial completed."""
        ...


def get_tuning_backend(settings: Settings, options: SageMakerOptions | None = None) -> TuningBackend:
    """The tuning backend for ``settings.profile``: SageMaker's for ``aws``.

    Raises:
        ValueError: for ``local``, which tunes with :class:`bincount.training.tuning.LocalTuner`'s ask/tell loop.
    """
    if settings.profile == "aws":
        return SageMakerTuningBackend(settings, options)
    raise ValueError(
        f"profile {settings.profile!r} tunes in the flow with bincount.training.tuning.LocalTuner; "
        "a tuning backend exists for profile 'aws' only"
    )


def decode_hyperparameters(values: dict[str, str], space: tuple[Parameter, ...]) -> dict[str, Any]:
    """SageMaker's string values (JSON-encoded by the SDK for framework estimators) typed as ``space`` says."""
    by_name = {parameter.name: parameter for parameter in space}
    decoded: dict[str, Any] = {}
    for name, raw in values.items():
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parameter = by_name.get(name)
        if isinstance(parameter, Continuous):
            value = float(value)
        elif isinstance(parameter, Integer):
            value = int(float(value))
        elif isinstance(parameter, Categorical):
            value = next((choice for choice in parameter.values if str(choice) == str(value)), value)
        decoded[name] = value
    return decoded


class SageMakerTuningBackend(SageMakerBackendBase):
    """One SageMaker hyperparameter tuning job per :class:`TuningSpec`."""

    def tuner(self, spec: TuningSpec) -> tuple[Any, dict[str, str]]:
        """The HyperparameterTuner (the training backend's Estimator with the static hyperparameters) and its channels."""
        from sagemaker.tuner import HyperparameterTuner

        trainer = SageMakerTrainingBackend(self.settings, self.options, session=self.session)
        template = TrainingJobSpec(
            name=spec.name, hyperparameters={}, channels=spec.channels, output_uri=spec.output_uri
        )
        return HyperparameterTuner(
            estimator=trainer.estimator(template, hyperparameters=dict(spec.static_hyperparameters)),
            objective_metric_name=spec.objective_metric,
            hyperparameter_ranges=sagemaker_ranges(spec.space),
            metric_definitions=METRIC_DEFINITIONS,
            strategy="Bayesian",
            objective_type=spec.objective_type,
            max_jobs=spec.max_jobs,
            max_parallel_jobs=spec.max_parallel_jobs,
            early_stopping_type=spec.early_stopping,
        ), trainer.channels(template)

    def tune(self, spec: TuningSpec, on_event: EventSink | None = None) -> TuningResult:
        """Start ``spec.name`` (or follow it, if a previous attempt started it) and read back the best trial.

        Raises:
            SageMakerJobFailed: the tuning job failed or no trial completed (with SageMaker's reason).
            SageMakerWaitTimeout: it outlived ``job_timeout_s`` and was asked to stop.
        """
        sink: EventSink = on_event or (lambda line: logger.info("%s", line))
        check_name(spec.name, "tuning")
        client = self.session.sagemaker_client
        if describe_or_none(client, TUNING_JOB, spec.name) is not None:
            sink(f"tuning job {spec.name} exists (an earlier attempt started it): following it")
        else:
            tuner, channels = self.tuner(spec)
            sink(f"starting tuning job {spec.name}: {spec.max_jobs} trials, {spec.max_parallel_jobs} at a time")
            try:
                tuner.fit(channels, job_name=spec.name, wait=False)
            except ClientError as error:
                if describe_or_none(client, TUNING_JOB, spec.name) is None:
                    raise
                sink(f"tuning job {spec.name} was created by a concurrent attempt ({error}): following it")
        description = wait_for(
            client, TUNING_JOB, spec.name, on_event=sink, timeout_s=self.options.job_timeout_s, backoff=self.backoff()
        )
        best = description.get("BestTrainingJob")
        if description["HyperParameterTuningJobStatus"] == "Failed" or not best:
            raise SageMakerJobFailed(
                "tuning job", spec.name, description["HyperParameterTuningJobStatus"],
                description.get("FailureReason") or "no training job completed",
            )
        best_job = client.describe_training_job(TrainingJobName=best["TrainingJobName"])
        objective = best.get("FinalHyperParameterTuningJobObjectiveMetric", {}).get("Value")
        result = TuningResult(
            name=spec.name,
            status=description["HyperParameterTuningJobStatus"],
            best_training_job=best["TrainingJobName"],
            best_hyperparameters={
                **spec.static_hyperparameters,
                **decode_hyperparameters(best.get("TunedHyperParameters", {}), spec.space),
            },
            best_objective=float(objective) if objective is not None else None,
            best_model_uri=best_job.get("ModelArtifacts", {}).get("S3ModelArtifacts"),
            trials=self.trials(spec),
            counters=dict(description.get("TrainingJobStatusCounters", {})),
        )
        sink(f"tuning job {spec.name}: best trial {result.best_training_job} ({spec.objective_metric} "
             f"{result.best_objective}) with {result.best_hyperparameters}")
        return result

    def trials(self, spec: TuningSpec) -> list[TrialResult]:
        """Every trial of the tuning job, in SageMaker's order, as the local tuner reports them."""
        client = self.session.sagemaker_client
        paginator = client.get_paginator("list_training_jobs_for_hyper_parameter_tuning_job")
        summaries = [
            summary
            for page in paginator.paginate(HyperParameterTuningJobName=spec.name)
            for summary in page["TrainingJobSummaries"]
        ]
        results = []
        for number, summary in enumerate(sorted(summaries, key=lambda s: s["TrainingJobName"])):
            objective = summary.get("FinalHyperParameterTuningJobObjectiveMetric", {}).get("Value")
            results.append(
                TrialResult(
                    number=number,
                    status=summary["TrainingJobStatus"],
                    hyperparameters=decode_hyperparameters(summary.get("TunedHyperParameters", {}), spec.space),
                    objective=float(objective) if objective is not None else None,
                    job_name=summary["TrainingJobName"],
                    failure_reason=summary.get("FailureReason"),
                )
            )
        return results
