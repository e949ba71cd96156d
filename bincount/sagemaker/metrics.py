"""An endpoint's invocation and error counts from CloudWatch (namespace ``AWS/SageMaker``, production variant).

SageMaker's capture records carry no status, so on profile ``aws`` the monitor's error rate is
``Invocation5XXErrors / Invocations`` over its window; ``Invocation4XXErrors`` are the callers' and are
reported apart. CloudWatch's periods are whole minutes: the window is widened to the minutes around it.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from bincount.config import Settings
from bincount.contracts.metrics import InvocationCounts
from bincount.sagemaker.guardrails import NAMESPACE, VARIANT, dimensions
from bincount.sagemaker.session import RETRIES, SageMakerOptions, boto_session

QUERIES = (
    ("invocations", "Invocations"),
    ("model_errors", "Invocation5XXErrors"),
    ("client_errors", "Invocation4XXErrors"),
)


class SageMakerInvocationMetrics:
    """:class:`~bincount.contracts.metrics.InvocationMetrics` read from CloudWatch's ``AWS/SageMaker`` metrics."""

    def __init__(self, settings: Settings, options: SageMakerOptions | None = None, client: Any = None) -> None:
        self.client = client or boto_session(settings, options or SageMakerOptions.load()).client(
            "cloudwatch", config=RETRIES
        )

    def invocation_counts(self, endpoint: str, start: dt.datetime, end: dt.datetime) -> InvocationCounts:
        """Sums of the variant's ``Invocations``, ``Invocation5XXErrors`` and ``Invocation4XXErrors`` in one period
        from ``start``'s minute to the minute past ``end``."""
        start = start.astimezone(dt.UTC).replace(second=0, microsecond=0)
        period = max(60, math.ceil((end - start).total_seconds() / 60) * 60)
        end = start + dt.timedelta(seconds=period)
        answer = self.client.get_metric_data(
            MetricDataQueries=[
                {
                    "Id": query_id,
                    "MetricStat": {
                        "Metric": {"Namespace": NAMESPACE, "MetricName": metric, "Dimensions": dimensions(endpoint)},
                        "Period": period,
                        "Stat": "Sum",
                    },
                    "ReturnData": True,
                }
                for query_id, metric in QUERIES
            ],
            StartTime=start,
            EndTime=end,
        )
        sums = {
            result["Id"]: int(sum(value for value in result["Values"] if value is not None))
            for result in answer["MetricDataResults"]
        }
        return InvocationCounts(
            invocations=sums.get("invocations", 0),
            model_errors=sums.get("model_errors", 0),
            client_errors=sums.get("client_errors", 0),
            start=start,
            end=end,
            source=f"CloudWatch {NAMESPACE} ({endpoint}/{VARIANT})",
        )
