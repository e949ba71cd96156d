"""Flow: stop an endpoint.

    stop-endpoint (delete the endpoint, forget its record) ─► endpoint artifact says "stopped"

What `bincount delete-endpoint NAME` runs (a flow, so the ``endpoint-<name>`` artifact, which a
Prefect API must write, records the stop in the same history as the deploys).
"""

from __future__ import annotations

from prefect import flow

from bincount.config import Location
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.serving import EndpointRecord
from tasks.deploy import stop_endpoint_task
from tasks.summary import run_summary


def stop_figures(result: EndpointRecord) -> dict[str, str | None]:
    """The run summary's key figures (a run that stopped an unrecorded endpoint has none)."""
    return {"endpoint": result.name, "stopped": result.url, "model version it served": result.model_ref}


SUMMARY = run_summary(stop_figures)


@flow(name="delete-endpoint", on_completion=[SUMMARY], on_failure=[SUMMARY])
def delete_endpoint(endpoint_name: str, location: Location = Location()) -> EndpointRecord | None:
    """Stop an endpoint and forget its record; returns the record it had (None if it had none).

    Args:
        endpoint_name: the endpoint to stop.
        location: where endpoint records live and which backend serves (default: the BINCOUNT_* variables).
    """
    check_endpoint_name(endpoint_name)
    return stop_endpoint_task(location.settings(), endpoint_name)
