"""Flows: roll an endpoint back to its previous production version; lift the hold a rollback leaves.

    under the endpoint's lock: previous production version (registry) ─► deploy (blue/green, checked; no request
    dropped) ─► record (the version rolled back from is held) + event

What `bincount models rollback ENDPOINT` runs, and what an automation can start (deployment
``rollback-model/on-demand``). The deploy and the record are one transaction: if either fails, the
endpoint keeps serving what it served and the registry is unchanged. The version rolled back from,
and any model with its digest or its recipe and data, is not promoted again until a person runs
`bincount models release-hold` (the ``release-hold`` flow).
"""

from __future__ import annotations

from prefect import flow

from bincount.config import Location
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.registry import ModelVersion
from bincount.contracts.serving import EndpointRecord
from bincount.factory import get_model_registry
from flows.promotion import deploy_version, endpoint_lock
from tasks.registry import release_hold_task
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
    with endpoint_lock(endpoint_name):
        target = get_model_registry(settings).previous_production(endpoint_name)
        return deploy_version(settings, endpoint_name, target, reason, actor, rollback=True)


@flow(name="release-hold")
def release_hold(version: str, reason: str, actor: str, location: Location = Location()) -> ModelVersion:
    """A person lifts the hold a rollback put on a version: it, and models like it, may be promoted again.

    Args:
        version: the held version, ``<group>:<number>`` (``bincount models list`` shows holds).
        reason: why (kept in the version's history).
        actor: the person who lifts it (kept in the version's history).
        location: where the registry lives (default: the BINCOUNT_* variables).
    """
    settings = location.settings()
    return release_hold_task(settings, get_model_registry(settings).resolve(version), actor, reason)
