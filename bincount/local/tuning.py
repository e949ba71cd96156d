"""Local hyperparameter tuning with Optuna's TPE sampler (SageMaker's Bayesian strategy's peer).

The tuner hands out trials in rounds of at most ``max_parallel_jobs``; ``run_trials`` (the Prefect
flow: one task run per trial) runs each round and the results go back with :meth:`LocalTuner.tell`.
Pruning is Optuna's median rule on per-epoch objective values: a trial is given, as plain
numbers, the median that finished trials reached at each epoch, and stops when it falls below it
(:meth:`bincount.contracts.tuning.TrialSpec.should_stop`). A failed trial is recorded as failed and
the search goes on.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from typing import Any, Literal, NamedTuple

import optuna
from optuna.trial import TrialState

from bincount.contracts.naming import job_name
from bincount.contracts.training import JobCost, LogSink, TrainingJob, TrainingJobFailed, TrainingJobSpec
from bincount.contracts.tuning import (
    Continuous,
    Integer,
    Parameter,
    TrialResult,
    TrialRunner,
    TrialSpec,
    TuningResult,
    TuningSpec,
)
from sm_scripts.metric_format import OBJECTIVE_METRIC

optuna.logging.set_verbosity(optuna.logging.WARNING)
logger = logging.getLogger(__name__)


def suggest(trial: optuna.trial.BaseTrial, space: tuple[Parameter, ...]) -> dict[str, Any]:
    """Hyperparameters for one Optuna trial."""
    values: dict[str, Any] = {}
    for parameter in space:
        if isinstance(parameter, Continuous):
            values[parameter.name] = trial.suggest_float(
                parameter.name, parameter.low, parameter.high, log=parameter.scaling == "Logarithmic"
            )
        elif isinstance(parameter, Integer):
            values[parameter.name] = trial.suggest_int(parameter.name, parameter.low, parameter.high)
        else:
            values[parameter.name] = trial.suggest_categorical(parameter.name, list(parameter.values))
    return values


class Suggestion(NamedTuple):
    number: int
    hyperparameters: dict[str, Any]
    prune_below: dict[int, float]


class LocalTuner:
    """An Optuna study over ``space`` that stops after ``max_jobs`` trials (failed ones count, as on SageMaker)."""

    def __init__(
        self,
        space: tuple[Parameter, ...],
        max_jobs: int,
        max_parallel_jobs: int = 1,
        objective_metric: str = OBJECTIVE_METRIC,
        direction: Literal["maximize", "minimize"] = "maximize",
        seed: int = 0,
        pruning_startup_trials: int = 2,
        pruning_warmup_epochs: int = 1,
    ) -> None:
        if max_jobs < 1 or max_parallel_jobs < 1:
            raise ValueError("max_jobs and max_parallel_jobs must be at least 1")
        self.space = space
        self.max_jobs = max_jobs
        self.max_parallel_jobs = max_parallel_jobs
        self.objective_metric = objective_metric
        self.direction = direction
        self.pruning_startup_trials = pruning_startup_trials
        self.pruning_warmup_epochs = pruning_warmup_epochs
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=min(5, max_jobs))
        self.study = optuna.create_study(direction=direction, sampler=sampler)
        self._running: dict[int, optuna.trial.Trial] = {}
        self.results: list[TrialResult] = []

    @property
    def finished(self) -> bool:
        return len(self.study.trials) >= self.max_jobs and not self._running

    def ask(self) -> list[Suggestion]:
        """The next round of trials: as many as free parallel slots and the job budget allow."""
        room = min(self.max_parallel_jobs - len(self._running), self.max_jobs - len(self.study.trials))
        specs = []
        for _ in range(max(room, 0)):
            trial = self.study.ask()
            self._running[trial.number] = trial
            specs.append(Suggestion(trial.number, suggest(trial, self.space), self._prune_thresholds()))
        return specs

    def tell(self, number: int, job: TrainingJob | None = None, failure: str | None = None) -> TrialResult:
        """Record trial ``number``: its job record, or the reason it failed."""
        trial = self._running.pop(number)
        result = TrialResult(number=number, status="Failed", hyperparameters=dict(trial.params))
        if job is None:
            self.study.tell(trial, state=TrialState.FAIL)
            result.failure_reason = failure or "unknown failure"
        else:
            for epoch in job.metric_history:
                if self.objective_metric in epoch and not math.isnan(epoch[self.objective_metric]):
                    trial.report(epoch[self.objective_metric], step=int(epoch["epoch"]))
            value = job.metrics.get(self.objective_metric)
            result.job_name, result.model_uri, result.metrics = job.name, job.model_uri, job.metrics
            result.objective = value
            if job.status == "Stopped":
                self.study.tell(trial, state=TrialState.PRUNED)
                result.status = "Stopped"
            elif value is None or math.isnan(value):
                self.study.tell(trial, state=TrialState.FAIL)
                result.failure_reason = f"the job reported no {self.objective_metric}"
            else:
                self.study.tell(trial, value)
                result.status = "Completed"
        self.results.append(result)
        return result

    def leaderboard(self) -> list[TrialResult]:
        """Completed trials best first, then stopped, then failed."""
        rank = {"Completed": 0, "Stopped": 1, "Failed": 2}
        sign = -1 if self.direction == "maximize" else 1

        def key(result: TrialResult) -> tuple:
            objective = (
                result.objective if result.objective is not None and not math.isnan(result.objective) else math.inf
            )
            return rank[result.status], sign * objective if objective != math.inf else math.inf, result.number

        return sorted(self.results, key=key)

    def best(self) -> TrialResult:
        """The best completed trial.

        Raises:
            RuntimeError: no trial completed; the message lists why each failed.
        """
        completed = [r for r in self.leaderboard() if r.status == "Completed"]
        if not completed:
            reasons = "; ".join(f"trial {r.number}: {r.failure_reason or r.status}" for r in self.results)
            raise RuntimeError(f"no tuning trial completed ({reasons})")
        return completed[0]

    def _prune_thresholds(self) -> dict[int, float]:
        """Per epoch, the median objective of finished trials that reached it (once enough have)."""
        by_epoch: dict[int, list[float]] = {}
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            for step, value in trial.intermediate_values.items():
                by_epoch.setdefault(int(step), []).append(value)
        return {
            epoch: statistics.median(values)
            for epoch, values in sorted(by_epoch.items())
            if epoch > self.pruning_warmup_epochs and len(values) >= self.pruning_startup_trials
        }


class LocalTuningBackend:
    """A :class:`LocalTuner` search whose rounds of trials ``run_trials`` runs on this machine."""

    def tune(self, spec: TuningSpec, run_trials: TrialRunner, on_event: LogSink | None = None) -> TuningResult:
        """Run the search to its end.

        Raises:
            RuntimeError: no trial completed; the message lists why each failed.
        """
        sink = on_event or logger.info
        direction: Literal["maximize", "minimize"] = "maximize" if spec.objective_type == "Maximize" else "minimize"
        tuner = LocalTuner(
            spec.space, spec.max_jobs, spec.max_parallel_jobs, spec.objective_metric, direction, spec.seed
        )
        costs: list[JobCost] = []  # the trials' CPU seconds
        while not tuner.finished:
            trials = [self._trial(spec, suggestion) for suggestion in tuner.ask()]
            for trial, outcome in zip(trials, run_trials(trials), strict=True):
                if not isinstance(outcome, BaseException) and outcome.cost is not None:
                    costs.append(outcome.cost)
                if isinstance(outcome, BaseException):
                    reason = outcome.job.failure_reason if isinstance(outcome, TrainingJobFailed) else repr(outcome)
                    sink(f"trial {trial.number} failed; the search goes on: {reason}")
                    tuner.tell(trial.number, failure=reason)
                else:
                    tuner.tell(trial.number, job=outcome)
        best = tuner.best()
        sink(f"best trial {best.number}: {spec.objective_metric} = {best.objective:.4f} with {best.hyperparameters}")
        return TuningResult(
            name=spec.name,
            status="Completed",
            best_training_job=best.job_name or "",
            best_hyperparameters={**spec.static_hyperparameters, **best.hyperparameters},
            best_objective=best.objective,
            best_model_uri=best.model_uri,
            trials=tuner.leaderboard(),
            counters=dict(Counter(result.status for result in tuner.results)),
            cost=JobCost.total(costs),
        )

    @staticmethod
    def _trial(spec: TuningSpec, suggestion: Suggestion) -> TrialSpec:
        job = TrainingJobSpec(
            name=job_name("trial", spec.name, suggestion.number),
            hyperparameters={**spec.static_hyperparameters, **suggestion.hyperparameters},
            channels=spec.channels,
            output_uri=spec.output_uri,
            local_cpus=spec.local_cpus,
        )
        return TrialSpec(
            number=suggestion.number,
            hyperparameters=suggestion.hyperparameters,
            job=job,
            objective_metric=spec.objective_metric,
            objective_type=spec.objective_type,
            prune_below=suggestion.prune_below,
        )
