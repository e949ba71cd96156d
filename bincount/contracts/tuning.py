"""Hyperparameter tuning: the search space, what to search (:class:`TuningSpec`), what came of it, and the seam.

Names in a space are spelled exactly like train.py's flags (``batch-size``), as SageMaker passes them.
Locally the backend asks the flow to run each round of trials (``run_trials``: one Prefect task
run per trial); on SageMaker the service runs the trials and ``run_trials`` is not called.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from bincount.contracts.training import JobCost, LogSink, TrainingJob, TrainingJobSpec


@dataclass(frozen=True)
class Continuous:
    name: str
    low: float
    high: float
    scaling: Literal["Linear", "Logarithmic"] = "Linear"


@dataclass(frozen=True)
class Integer:
    name: str
    low: int
    high: int


@dataclass(frozen=True)
class Categorical:
    name: str
    values: tuple[Any, ...]


Parameter = Continuous | Integer | Categorical

SEEDS_SEARCH_SPACE: tuple[Parameter, ...] = (
    Continuous("lr", 0.01, 0.1, "Logarithmic"),
    Categorical("batch-size", (32, 64, 128)),
    Integer("epochs", 1, 10),
)
"""Learning rate 0.01-0.1 (log scale), batch size {32, 64, 128}, epochs 1-10."""


def space_from_dicts(items: list[dict[str, Any]]) -> tuple[Parameter, ...]:
    """A space from plain dicts (flow parameters): ``{"type": "continuous", "name": "lr", "low": .., "high": ..}``."""
    kinds = {"continuous": Continuous, "integer": Integer, "categorical": Categorical}
    space = []
    for item in items:
        fields = dict(item)
        kind = fields.pop("type", None)
        if kind not in kinds:
            raise ValueError(f"search-space entry {item} needs a type: one of {', '.join(kinds)}")
        if kind == "categorical":
            fields["values"] = tuple(fields["values"])
        try:
            space.append(kinds[kind](**fields))
        except TypeError as error:
            raise ValueError(f"search-space entry {item}: {error}") from None
    return tuple(space)


@dataclass(frozen=True)
class TuningSpec:
    """A search: ``name`` (a tuning job's name: 32 characters at most), the space, fixed hyperparameters, channels."""

    name: str
    space: tuple[Parameter, ...]
    static_hyperparameters: dict[str, Any]
    channels: dict[str, str]
    output_uri: str
    max_jobs: int
    max_parallel_jobs: int
    objective_metric: str
    objective_type: Literal["Maximize", "Minimize"] = "Maximize"
    seed: int = 0
    local_cpus: int | None = None
    early_stopping: Literal["Auto", "Off"] = "Auto"


@dataclass(frozen=True)
class TrialSpec:
    """One trial to run: its tuned values, the job that runs it, and the per-epoch bar it must clear to go on.

    ``prune_below`` maps an epoch to the objective the median finished trial reached there; a trial
    that does worse at that epoch is stopped early (Optuna's median rule, SageMaker's ``Auto`` stopping).
    """

    number: int
    hyperparameters: dict[str, Any]
    job: TrainingJobSpec
    objective_metric: str
    objective_type: Literal["Maximize", "Minimize"] = "Maximize"
    prune_below: dict[int, float] = field(default_factory=dict)

    def should_stop(self, history: list[dict[str, float]]) -> bool:
        """A :data:`~bincount.contracts.training.StopCheck`: whether the latest epoch falls below the bar."""
        latest = history[-1]
        bar = self.prune_below.get(int(latest.get("epoch", 0)))
        value = latest.get(self.objective_metric)
        if bar is None or value is None:
            return False
        if math.isnan(value):
            return True
        return value < bar if self.objective_type == "Maximize" else value > bar


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


@dataclass
class TuningResult:
    """What a search found: the trials best first; ``best_hyperparameters`` = static + tuned."""

    name: str
    status: str
    best_training_job: str
    best_hyperparameters: dict[str, Any]
    best_objective: float | None
    best_model_uri: str | None
    trials: list[TrialResult] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    cost: JobCost | None = None  # every trial's job together; None where the backend did not say

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TrialRunner = Callable[[list[TrialSpec]], list[TrainingJob | BaseException]]
"""Runs a round of trials side by side; one job record (or the error it raised) per trial, in order."""


class TuningBackend(Protocol):
    def tune(self, spec: TuningSpec, run_trials: TrialRunner, on_event: LogSink | None = None) -> TuningResult:
        """Run (or follow) the search ``spec.name`` to its end; raise if no trial completed."""
        ...
