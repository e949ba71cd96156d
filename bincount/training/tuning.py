"""Local hyperparameter tuning with Optuna's TPE sampler (SageMaker's Bayesian strategy's peer).

The tuner hands out trials in rounds of at most ``max_parallel_jobs``; whoever runs them (the
Prefect flow, one task run per trial) reports each back with :meth:`LocalTuner.tell`. Pruning
is Optuna's median rule on per-epoch objective values: a trial is given, as plain numbers, the
median that completed trials reached at each epoch, and stops when it falls below it
(:func:`median_stop_check`). A failed trial is recorded as failed and the search goes on.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from bincount.training.backend import StopCheck
from bincount.training.jobs import TrainingJob
from bincount.training.search_space import Parameter, suggest
from sm_scripts.metric_format import OBJECTIVE_METRIC

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class TrialSpec:
    """One trial to run: its hyperparameters and the per-epoch bar it must clear to go on."""

    number: int
    hyperparameters: dict[str, Any]
    prune_below: dict[int, float]


@dataclass
class TrialResult:
    """A trial's outcome, for the leaderboard."""

    number: int
    status: str  # Completed, Stopped (pruned) or Failed
    hyperparameters: dict[str, Any]
    objective: float | None = None
    job_name: str | None = None
    model_uri: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    failure_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def median_stop_check(
    prune_below: dict[int, float], objective_metric: str = OBJECTIVE_METRIC, direction: str = "maximize"
) -> StopCheck:
    """Stop a job when its objective at an epoch is worse than the median others reached there."""

    def should_stop(history: list[dict[str, float]]) -> bool:
        latest = history[-1]
        bar = prune_below.get(int(latest.get("epoch", 0)))
        value = latest.get(objective_metric)
        if bar is None or value is None:
            return False
        if math.isnan(value):
            return True
        return value < bar if direction == "maximize" else value > bar

    return should_stop


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

    def ask(self) -> list[TrialSpec]:
        """The next round of trials: as many as free parallel slots and the job budget allow."""
        room = min(self.max_parallel_jobs - len(self._running), self.max_jobs - len(self.study.trials))
        specs = []
        for _ in range(max(room, 0)):
            trial = self.study.ask()
            self._running[trial.number] = trial
            specs.append(TrialSpec(trial.number, suggest(trial, self.space), self._prune_thresholds()))
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
            objective = result.objective if result.objective is not None and not math.isnan(result.objective) else math.inf
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
