"""Hyperparameter tuning as one SageMaker tuning job.

The service runs the whole search: one ``HyperparameterTuner`` job (Bayesian, ``max_jobs``,
``max_parallel_jobs``, early stopping) over the shared search space, the metric definitions from
``sm_scripts/metric_format.py``, and the best hyperparameters read back from the tuning job.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from botocore.exceptions import ClientError

from bincount.contracts.naming import check_name
from bincount.contracts.training import JobCost, LogSink, TrainingJobSpec
from bincount.contracts.tuning import (
    Categorical,
    Continuous,
    Integer,
    Parameter,
    TrialResult,
    TrialRunner,
    TuningResult,
    TuningSpec,
)
from bincount.sagemaker.session import SageMakerBackendBase, resource_tags
from bincount.sagemaker.training import SageMakerTrainingBackend, job_cost, price_table
from bincount.sagemaker.waiting import TUNING_JOB, SageMakerJobFailed, describe_or_none, wait_for
from sm_scripts.metric_format import METRIC_DEFINITIONS

logger = logging.getLogger(__name__)


def sagemaker_ranges(space: tuple[Parameter, ...]) -> dict[str, Any]:
    """``hyperparameter_ranges`` for ``sagemaker.tuner.HyperparameterTuner`` (SageMaker SDK v2)."""
    from sagemaker.tuner import CategoricalParameter, ContinuousParameter, IntegerParameter

    ranges: dict[str, Any] = {}
    for parameter in space:
        if isinstance(parameter, Continuous):
            ranges[parameter.name] = ContinuousParameter(parameter.low, parameter.high, scaling_type=parameter.scaling)
        elif isinstance(parameter, Integer):
            ranges[parameter.name] = IntegerParameter(parameter.low, parameter.high)
        else:
            ranges[parameter.name] = CategoricalParameter(list(parameter.values))
    return ranges


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
        """The HyperparameterTuner (the training backend's Estimator, static hyperparameters) and its channels."""
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
            tags=resource_tags(),  # SageMaker adds a tuning job's tags to every training job it starts
        ), trainer.channels(template)

    def tune(
        self, spec: TuningSpec, run_trials: TrialRunner | None = None, on_event: LogSink | None = None
    ) -> TuningResult:
        """Start ``spec.name`` (or follow it, if a previous attempt started it) and read back the best trial.

        ``run_trials`` is not called: SageMaker runs the trials.

        Raises:
            SageMakerJobFailed: the tuning job failed or no trial completed (with SageMaker's reason).
            SageMakerWaitTimeout: it outlived ``job_timeout_s`` and was asked to stop.
        """
        sink: LogSink = on_event or (lambda line: logger.info("%s", line))
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
                "tuning job",
                spec.name,
                description["HyperParameterTuningJobStatus"],
                description.get("FailureReason") or "no training job completed",
            )
        best_job = client.describe_training_job(TrainingJobName=best["TrainingJobName"])
        trials = self.trials(spec)
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
            trials=ranked(trials, spec.objective_type),
            counters=dict(description.get("TrainingJobStatusCounters", {})),
            cost=self.trials_cost(trials),
        )
        sink(
            f"tuning job {spec.name}: best trial {result.best_training_job} ({spec.objective_metric} "
            f"{result.best_objective}) with {result.best_hyperparameters}"
            + (f"; its {len(trials)} trials cost {result.cost.summary()}" if result.cost else "")
        )
        return result

    def trials_cost(self, trials: list[TrialResult]) -> JobCost | None:
        """What the trials' jobs were billed together (each one's DescribeTrainingJob, priced as a training job is)."""
        client, prices = self.session.sagemaker_client, price_table()
        costs = []
        for job in [trial.job_name for trial in trials if trial.job_name]:  # SageMaker's trials all have one
            description = client.describe_training_job(TrainingJobName=job)
            if "BillableTimeInSeconds" in description or "TrainingTimeInSeconds" in description:
                costs.append(job_cost(description, prices))
        return JobCost.total(costs)

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


def ranked(trials: list[TrialResult], objective_type: str) -> list[TrialResult]:
    """Trials with an objective best first, then the rest."""
    sign = -1.0 if objective_type == "Maximize" else 1.0
    return sorted(trials, key=lambda trial: (trial.objective is None, sign * (trial.objective or 0.0)))
