"""Flows: stop an endpoint; promote or stop its shadow.

    stop-endpoint (delete the endpoint, forget its record) ─► endpoint artifact says "stopped"
    end-shadow (promote: the shadow answers from now on, and its version becomes production; or stop it)
        ─► endpoint artifact with the shadow's report; bincount.endpoint.rollout.* events

What `bincount delete-endpoint NAME` and `bincount endpoints promote-shadow|stop-shadow NAME` run (flows,
so the ``endpoint-<name>`` artifact, which a Prefect API must write, records them in the same history as
the deploys).
"""

from __future__ import annotations

from prefect import flow

from bincount.config import Location
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.serving import EndpointRecord
from bincount.factory import get_model_registry
from flows.promotion import endpoint_lock
from tasks.deploy import end_shadow_task, stop_endpoint_task
from tasks.registry import set_stage_task
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


@flow(name="promote-shadow")
def promote_shadow(endpoint_name: str, location: Location = Location()) -> EndpointRecord:
    """Make the shadow model of an endpoint the one that answers, and its registered version production.

    Args:
        endpoint_name: the endpoint whose shadow is promoted.
        location: where endpoint records and the registry live (default: the BINCOUNT_* variables).
    """
    check_endpoint_name(endpoint_name)
    settings = location.settings()
    with endpoint_lock(endpoint_name):  # one step, like a nightly's promotion: no other one between the two
        record = end_shadow_task(settings, endpoint_name, promote=True)
        if record.model_ref:
            version = get_model_registry(settings).resolve(record.model_ref)
            set_stage_task(settings, version, "production", "bincount", "shadow promoted")
    return record


@flow(name="stop-shadow")
def stop_shadow(endpoint_name: str, location: Location = Location()) -> EndpointRecord:
    """Stop the shadow of an endpoint; the current model keeps serving.

    Args:
        endpoint_name: the endpoint whose shadow stops.
        location: where endpoint records live (default: the BINCOUNT_* variables).
    """
    check_endpoint_name(endpoint_name)
    return end_shadow_task(location.settings(), endpoint_name, promote=False)
