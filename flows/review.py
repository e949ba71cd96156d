"""Flow: a person's decision on a registered model version, what `bincount models approve|reject` runs.

    resolve the version ─► approve or reject (who and why kept in its history) ─► event + model-registry artifact

Through a flow, so a decision made at the command line shows in the UI like one made by a pipeline
run: the ``bincount.model.approved|rejected`` event and the refreshed ``model-registry-<group>`` table.
"""

from __future__ import annotations

from prefect import flow

from bincount.config import Location
from bincount.contracts.registry import ModelVersion
from bincount.factory import get_model_registry
from tasks.registry import set_approval_task


@flow(name="review-model")
def review_model(
    version: str, approve: bool, reason: str, actor: str = "bincount", location: Location = Location()
) -> ModelVersion:
    """Approve or reject a registered version.

    Args:
        version: ``<group>:<number>`` (``bincount:3``), ``<group>:latest`` or ``<group>:production``.
        approve: true approves it (it may then go to production), false rejects it for good.
        reason: why (kept in the version's history).
        actor: who decides (kept in the version's history).
        location: where the registry lives (default: the BINCOUNT_* variables).
    """
    settings = location.settings()
    target = get_model_registry(settings).resolve(version)
    return set_approval_task(settings, target, approve, actor, reason)
