"""What a SageMaker endpoint has cost so far, from its record and the dated price table (``prices.json``).

A real-time endpoint bills its instances by the second from the moment they are in service, whether or not
requests come: ``replicas`` x hours since the record's ``deployed_at`` (when its current config went in service)
x the hourly price. A scaled endpoint's count varies; the record's count is the one it was deployed with, so the
figure is a floor. Cost Explorer by tag has the billed truth (docs/AWS.md: Cost per run).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from bincount.contracts.serving import EndpointRecord
from bincount.contracts.training import EndpointCost
from bincount.sagemaker.training import price_table


def endpoint_cost(
    record: EndpointRecord, now: dt.datetime | None = None, prices: dict[str, Any] | None = None
) -> EndpointCost | None:
    """The cost of ``record``'s endpoint since its current config went in service; None for a local endpoint."""
    if record.backend != "sagemaker":
        return None
    since = dt.datetime.fromisoformat(record.deployed_at)
    hours = round(max(0.0, ((now or dt.datetime.now(dt.UTC)) - since).total_seconds() / 3600), 3)
    if record.details.get("serverless"):  # no instances: billed per request's compute
        return EndpointCost(record.name, instance_type=None, instances=0, since=record.deployed_at, hours=hours)
    prices = prices if prices is not None else price_table()
    instance_type = record.details.get("instance_type")
    instances = record.replicas or 1
    hourly = prices.get("per_instance_hour", {}).get(instance_type)
    return EndpointCost(
        endpoint=record.name,
        instance_type=instance_type,
        instances=instances,
        since=record.deployed_at,
        hours=hours,
        usd=None if hourly is None else round(instances * hours * hourly, 4),
        price_source=prices.get("source"),
    )
