"""Invocation metrics: how many requests an endpoint answered in a window and how many failed, and whose fault.

Where capture records carry no status (SageMaker's own), the monitor's error rate comes from here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class InvocationCounts:
    """An endpoint's invocations between ``start`` and ``end``, as the platform serving it counted them.

    ``model_errors``: answers that are the model's fault (5xx, SageMaker's ``Invocation5XXErrors``);
    ``client_errors``: the caller's (4xx, ``Invocation4XXErrors``), never counted as the model's.
    """

    invocations: int
    model_errors: int
    client_errors: int
    start: dt.datetime
    end: dt.datetime
    source: str  # where the counts come from, for the report ("CloudWatch AWS/SageMaker")


class InvocationMetrics(Protocol):
    """The serving platform's own counts of an endpoint's invocations (profile ``aws``: CloudWatch)."""

    def invocation_counts(self, endpoint: str, start: dt.datetime, end: dt.datetime) -> InvocationCounts:
        """The production variant's invocations and errors from ``start`` to ``end`` (whole minutes around them)."""
        ...
