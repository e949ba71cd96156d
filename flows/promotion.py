"""Flow steps shared by the pipeline and the nightly retrain: approve a registered version, then put it in production.

    register-model ─► approve (at once, or a person resumes the paused run in the UI) ─► deploy ─► production
                            └─ rejected, or no answer within the timeout: the serving model stays

Approval, where asked for, pauses the flow run with a typed form (:class:`ApprovalInput`): in the
Prefect UI the run shows "Paused" with a Resume button that asks for the decision. With no answer
within the timeout the version is rejected and the run goes on without deploying it.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from bincount.config import Settings
from bincount.contracts.registry import ModelVersion
from bincount.contracts.serving import EndpointRecord, RolloutStrategy, ScalingConfig
from tasks.deploy import deploy_model
from tasks.registry import set_approval_task, set_stage_task

APPROVAL_POLL_S = 2


class ApprovalInput(RunInput):
    """The form a reviewer fills in to resume a paused run."""

    approve: bool = Field(description="Approve the model for production; false rejects it.")
    reviewer: str = Field(description="Who decides (kept in the version's history).")
    reason: str = Field(description="Why (kept in the version's history).")


def approve_version(
    settings: Settings, version: ModelVersion, require_approval: bool, timeout_s: int, passed: str
) -> ModelVersion:
    """Approve ``version``: at once when no person is asked (``passed`` says what it passed), else by the
    reviewer who resumes this paused run; rejected when nobody answers within ``timeout_s``."""
    if not require_approval:
        return set_approval_task(settings, version, True, "bincount", passed)
    logger = get_run_logger()
    logger.info(
        "%s waits for approval (%s): resume this flow run in the Prefect UI within %d s to approve or reject it",
        version.ref,
        passed,
        timeout_s,
    )
    try:
        answer = pause_flow_run(wait_for_input=ApprovalInput, timeout=timeout_s, poll_interval=APPROVAL_POLL_S)
    except FlowPauseTimeout:
        return set_approval_task(settings, version, False, "bincount", f"no reviewer answered within {timeout_s} s")
    return set_approval_task(settings, version, answer.approve, answer.reviewer, answer.reason)


def put_in_production(
    settings: Settings,
    endpoint_name: str,
    version: ModelVersion,
    reason: str,
    capture_percentage: int | None = None,
    strategy: RolloutStrategy | None = None,
    scaling: ScalingConfig | None = None,
) -> EndpointRecord:
    """Deploy an approved version (as ``strategy`` says, default blue/green; checked, rolled back on failure), then
    mark it production. A shadow only becomes production when it is promoted (``bincount endpoints
    promote-shadow``). ``capture_percentage`` and ``scaling`` None keep the endpoint's settings."""
    logger = get_run_logger()
    endpoint = deploy_model(
        settings, endpoint_name, version, capture_percentage=capture_percentage, strategy=strategy, scaling=scaling
    )
    if (endpoint.details.get("rollout") or {}).get("verdict") == "shadowing":
        logger.info("%s shadows the serving model: it becomes production when the shadow is promoted", version.ref)
        return endpoint
    set_stage_task(settings, version, "production", "bincount", reason)
    return endpoint
