"""Flow steps shared by the pipeline, the nightly retrain and the rollback: approve a registered version, then put
it in production as one step under the endpoint's lock.

    register-model ─► approve (at once, or a person resumes the paused run in the UI)
        ─► under the endpoint's lock:  re-read what serves ─► compare (nightly) ─► deploy ─► production ─► record
                                                                 └── one transaction ──┘
                            └─ rejected, or no answer within the timeout: the serving model stays

Approval, where asked for, pauses the flow run with a typed form (:class:`ApprovalInput`): in the
Prefect UI the run shows "Paused" with a Resume button that asks for the decision. With no answer
within the timeout the version is rejected and the run goes on without deploying it. Nobody waits
for a person while holding the lock: after the answer, the comparison is made again against what
serves then.

The registry invariants that involve an endpoint (docs/CONTRACTS.md, "Registry invariants") are kept
here, in :func:`deploy_version`, the one step that puts a registered version on an endpoint: the
deploy, its check and the registry's stage change form one transaction, so a failure after the
deploy puts the previous model back and the registry and the endpoint agree. The endpoint's lock
(:func:`endpoint_lock`) keeps a pipeline, a nightly and a rollback of the same endpoint from
interleaving.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.events import emit_event
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.transactions import transaction
from pydantic import Field

from bincount.config import Settings
from bincount.contracts.registry import PROMOTION_METRIC, Decision, ModelVersion
from bincount.contracts.serving import EndpointRecord, RolloutStrategy, ScalingConfig
from bincount.evaluation import Evaluation
from bincount.factory import get_model_registry
from bincount.registry import decide, now_iso
from tasks.deploy import check_endpoint_task, deploy_endpoint_task, describe_endpoint_task
from tasks.evaluate import evaluate_and_publish
from tasks.registry import record_decision_task, record_rollback_task, set_approval_task, set_stage_task
from tasks.train import ensure_concurrency_limit

APPROVAL_POLL_S = 2


class ApprovalInput(RunInput):
    """The form a reviewer fills in to resume a paused run."""

    approve: bool = Field(description="Approve the model for production; false rejects it.")
    reviewer: str = Field(description="Who decides (kept in the version's history).")
    reason: str = Field(description="Why (kept in the version's history).")


def endpoint_lock_name(endpoint_name: str) -> str:
    """The Prefect global concurrency limit (one slot) that is the endpoint's lock."""
    return f"bincount-endpoint-{endpoint_name}"


@contextmanager
def endpoint_lock(endpoint_name: str) -> Iterator[None]:
    """Hold the endpoint's lock: one promotion or rollback of ``endpoint_name`` at a time, across processes and
    machines, on either profile (a Prefect global concurrency limit of one slot, created on first use; its lease
    lapses when the holder dies)."""
    name = endpoint_lock_name(endpoint_name)
    ensure_concurrency_limit(name)
    with concurrency(name, occupy=1, strict=True):
        yield


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


def serving_version(settings: Settings, endpoint_name: str) -> ModelVersion | None:
    """What serves ``endpoint_name`` now, as a registered version: the version the endpoint's record names (else
    the group's production version, where no endpoint is recorded); None when nothing serves."""
    registry = get_model_registry(settings)
    record = describe_endpoint_task(settings, endpoint_name)
    if record is None:
        return registry.production(endpoint_name)
    if record.model_ref:
        return registry.resolve(record.model_ref)
    return registry.find_by_model_uri(endpoint_name, record.model_uri) or registry.production(endpoint_name)


def deploy_version(
    settings: Settings,
    endpoint_name: str,
    version: ModelVersion,
    reason: str,
    actor: str = "bincount",
    *,
    rollback: bool = False,
    capture_percentage: int | None = None,
    strategy: RolloutStrategy | None = None,
    scaling: ScalingConfig | None = None,
) -> EndpointRecord:
    """Deploy ``version``, check it and make it production in one transaction (call it under
    :func:`endpoint_lock`): a failed check or registry write puts the previous model back on the endpoint.

    ``rollback`` records it as a rollback (the version rolled back from is then held). The deploy of the version
    that already serves changes nothing and says so. A shadow becomes production only when it is promoted
    (``bincount endpoints promote-shadow``).
    """
    logger = get_run_logger()
    if not rollback:
        get_model_registry(settings).check_promotable(version)  # before the deploy, not after it
    with transaction():
        endpoint = deploy_endpoint_task(
            settings, endpoint_name, version.model_uri, str(version.ref), capture_percentage, strategy, scaling
        )
        check_endpoint_task(settings, endpoint_name)
        if (endpoint.details.get("rollout") or {}).get("verdict") == "shadowing":
            logger.info("%s shadows the serving model: it becomes production when the shadow is promoted", version.ref)
            return endpoint
        if rollback:
            record_rollback_task(settings, endpoint_name, actor, reason)
        else:
            set_stage_task(settings, version, "production", actor, reason)
    return endpoint


def put_in_production(
    settings: Settings,
    endpoint_name: str,
    version: ModelVersion,
    reason: str,
    capture_percentage: int | None = None,
    strategy: RolloutStrategy | None = None,
    scaling: ScalingConfig | None = None,
) -> EndpointRecord:
    """Deploy an approved version (as ``strategy`` says, default blue/green; checked, rolled back on failure) and
    mark it production, under the endpoint's lock. ``capture_percentage`` and ``scaling`` None keep the
    endpoint's settings."""
    with endpoint_lock(endpoint_name):
        return deploy_version(
            settings,
            endpoint_name,
            version,
            reason,
            capture_percentage=capture_percentage,
            strategy=strategy,
            scaling=scaling,
        )


def compare_with_serving(
    settings: Settings,
    endpoint_name: str,
    candidate: ModelVersion,
    challenger: Evaluation,
    test_channel_uri: str,
    margin: float,
) -> Decision:
    """The challenger against what serves now (re-read), both scored as they serve on the same test images; held
    when it matches a version a rollback holds."""
    serving = serving_version(settings, endpoint_name)
    if serving is not None and serving.version == candidate.version:  # never compared with itself
        score = challenger.to_dict()[PROMOTION_METRIC]
        return Decision(
            endpoint_name=endpoint_name,
            promoted=False,
            reason=f"{candidate.ref} already serves: nothing to compare it with",
            metric=PROMOTION_METRIC,
            challenger_score=score,
            serving_score=score,
            margin=margin,
            challenger_model_uri=candidate.model_uri,
            serving_model_uri=serving.model_uri,
            decided_at=now_iso(),
            challenger_version=candidate.version,
            serving_version=serving.version,
            outcome="nothing-new",
        )
    scores = (
        None
        if serving is None
        else evaluate_and_publish(settings, serving.model_uri, test_channel_uri, role="serving").to_dict()
    )
    decision = decide(
        endpoint_name,
        challenger.to_dict(),
        candidate.model_uri,
        scores,
        serving.model_uri if serving else None,
        margin,
        challenger_version=candidate.version,
        serving_version=serving.version if serving else None,
    )
    held = get_model_registry(settings).held_by(endpoint_name, candidate.spec)
    if held is not None and held.hold is not None:
        return decision.with_outcome(
            "held",
            f"{decision.reason}; but {candidate.ref} matches {held.ref} (its model, or its recipe and data), held "
            f"since a rollback by {held.hold.actor} ({held.hold.reason}): a person lifts the hold with "
            f"`bincount models release-hold {held.ref} --reason ...`",
        )
    return decision.with_outcome("promoted" if decision.promoted else "kept")


def conclude(settings: Settings, candidate: ModelVersion, decision: Decision) -> Decision:
    """Record a decision that did not put the candidate in production; the candidate is archived."""
    if get_model_registry(settings).get(candidate.group, candidate.version).stage == "candidate":
        set_stage_task(settings, candidate, "archived", "nightly", decision.reason)
    record_decision_task(settings, decision)
    publish_decision(decision)
    return decision


def promote_challenger(
    settings: Settings,
    candidate: ModelVersion,
    challenger: Evaluation,
    test_channel_uri: str,
    margin: float,
    require_approval: bool = False,
    approval_timeout_s: int = 24 * 3600,
    strategy: RolloutStrategy | None = None,
    scaling: ScalingConfig | None = None,
) -> Decision:
    """Compare a registered challenger with what serves its endpoint (the group's name) and promote it if it is
    better, as one step under the endpoint's lock; every outcome is recorded, a failed deploy's too (then raised).

    With ``require_approval`` a person is asked first (without the lock held); the comparison is made again
    under the lock against what serves then.
    """
    endpoint_name = candidate.group
    if require_approval:
        first = compare_with_serving(settings, endpoint_name, candidate, challenger, test_channel_uri, margin)
        if first.outcome != "promoted":
            return conclude(settings, candidate, first)
        candidate = approve_version(settings, candidate, True, approval_timeout_s, first.reason)
        if candidate.approval != "Approved":
            by = candidate.history[-1]
            rejected = first.with_outcome("rejected", f"{first.reason}, but {by.actor} rejected it: {by.reason}")
            return conclude(settings, candidate, rejected)
    with endpoint_lock(endpoint_name):
        decision = compare_with_serving(settings, endpoint_name, candidate, challenger, test_channel_uri, margin)
        get_run_logger().info("%s: %s", decision.outcome, decision.reason)
        if decision.outcome != "promoted":
            return conclude(settings, candidate, decision)
        if candidate.approval != "Approved":
            candidate = approve_version(settings, candidate, False, approval_timeout_s, decision.reason)
        try:
            deploy_version(
                settings, endpoint_name, candidate, f"nightly: {decision.reason}", strategy=strategy, scaling=scaling
            )
        except Exception as error:
            conclude(
                settings,
                candidate,
                decision.with_outcome(
                    "deploy-failed", f"{decision.reason}; but its deploy failed, what served still serves: {error}"
                ),
            )
            raise
        record_decision_task(settings, decision)
    publish_decision(decision)
    return decision


def publish_decision(decision: Decision) -> None:
    """The decision as the endpoint's ``nightly-decision-<endpoint>`` artifact and a ``bincount.model.promoted`` /
    ``kept`` event (its payload says the outcome)."""
    verdict = {
        "promoted": "promoted",
        "held": "held: not promoted without a person",
        "rejected": "rejected by a person",
        "deploy-failed": "its deploy failed",
        "nothing-new": "nothing new",
    }.get(decision.outcome, "kept the serving model")
    serving = "-" if decision.serving_score is None else f"{decision.serving_score:.3g}"
    challenger = (
        "-" if decision.challenger_version is None else f"{decision.endpoint_name}:{decision.challenger_version}"
    )
    champion = "-" if decision.serving_version is None else f"{decision.endpoint_name}:{decision.serving_version}"
    create_markdown_artifact(
        key=f"nightly-decision-{decision.endpoint_name.lower()}",
        markdown=(
            f"### Nightly retrain of `{decision.endpoint_name}`: {verdict}\n\n"
            f"| | version | test {decision.metric} |\n|---|---|---|\n"
            f"| challenger | `{challenger}` | {decision.challenger_score:.3g} |\n"
            f"| serving | `{champion}` | {serving} |\n\n"
            f"Margin {decision.margin:.3g}. {decision.reason}."
        ),
        description=f"Nightly decision for {decision.endpoint_name}: {verdict}",
    )
    emit_event(
        event="bincount.model.promoted" if decision.promoted else "bincount.model.kept",
        resource={"prefect.resource.id": f"bincount.endpoint.{decision.endpoint_name}"},
        payload=decision.to_dict(),
    )
