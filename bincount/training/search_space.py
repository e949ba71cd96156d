"""The seeds' hyperparameter search space, defined once, for Optuna and for SageMaker's tuner.

Names are spelled exactly like train.py's flags (``batch-size``), as SageMaker passes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import optuna


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
        space.append(kinds[kind](**fields))
    return tuple(space)
