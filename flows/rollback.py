"""Flow: roll an endpoint back to its previous production version.

    previous production version (registry) ─► deploy (blue/green, checked; no request dropped) ─► record + event

What `bincount models rollback ENDPOINT` runs, and what an automation can start (deployment
``rollback-model/on-demand``). The deploy comes first: if it fails, the endpoint keeps serving what
it served and the registry is unchanged.
"""

from __future__ import annotations

from prefect import flow

from bincount.config import Location
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.serving import EndpointRecord
from bincount.factory import get_model_registry
from tasks.deploy import deploy_model
from tasks.registry import record_rollback_task
from tasks.summary import run_summary


def rollback_figures(result: EndpointRecord) -> dict[str, str | None]:
    """The run summary's key figures."""
    return {
        "endpoint": f"{result.name} at {result.url}",
        "model version": result.model_ref,
        "replaced version": result.previous_model_ref,
    }


SUMMARY = run_summary(rollback_figures)


@flow(name="rollback-model", on_completion=[SUMMARY], on_failure=[SUMMARY])
def rollback_model(
    endpoint_name: str = "bincount",
    reason: str = "rolled back",
    actor: str = "bincount",
    location: Location = Location(),
) -> EndpointRecord:
    """Deploy the endpoint's previous production version again and record the rollback.

    Args:
        endpoint_name: the endpoint (and model group) to roll back.
        reason: why (kept in the version's history).
        actor: who or what rolls back (kept in the version's history).
        location: where the registry and endpoint records live (default: the BINCOUNT_* variables).
    """
    check_endpoint_name(endpoint_name)
    settings = location.settings()
    target = get_model_registry(settings).previous_production(endpoint_name)
    endpoint = deploy_model(settings, endpoint_name, target)
    record_rollback_task(settings, endpoint_name, actor, reason)
    return endpoint
