"""Flow steps shared by the pipeline, the nightly retrain and the rollback: approve a registered version, then put
it in production as one step under the endpoint's lock.

    register-model ─► approve (at once, or a person resumes the paused run in the UI)
        ─► under the endpoint's lock:  re-read what serves ─► compare (nightly) ─► deploy ─► production ─► record
                                                                 └── one transaction ──┘
                            └─ rejected, or no answer within the timeout: the serving model stays

Approval, where asked for, pauses the flow run with a typed form (:class:`ApprovalInput`): in the
Prefect UI the run shows "Paused" with a Resume button that asks for the decision, above a description
of the version (:func:`approval_description`: its scores against the champion with the evidence of the
decision, its lineage, a link to its model card). The pause's key names the version
(:func:`approval_pause_key`), so `bincount models approve|reject <group>:<n>` finds the run that waits
and answers it (:func:`answer_waiting_approval`). With no answer within the timeout the version is
rejected and the run goes on without deploying it. Nobody waits for a person while holding the lock:
after the answer, the comparison is made again against what serves then.

The registry invariants that involve an endpoint (docs/CONTRACTS.md, "Registry invariants") are kept
here, in :func:`deploy_version`, the one step that puts a registered version on an endpoint: the
deploy, its check and the registry's stage change form one transaction, so a failure after the
deploy puts the previous model back and the registry and the endpoint agree. The endpoint's lock
(:func:`endpoint_lock`) keeps a pipeline, a nightly and a rollback of the same endpoint from
interleaving.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from prefect import get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.concurrency.sync import concurrency
from prefect.events import emit_event
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from prefect.transactions import transaction
from pydantic import Field

from bincount.config import Settings
from bincount.contracts.registry import PROMOTION_CONFIDENCE, PROMOTION_METRIC, Decision, ModelVersion, StageEvent
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


def approval_pause_key(version_ref: str) -> str:
    """The key of the pause that waits for a person's answer on ``version_ref`` (``bincount:3`` ->
    ``approve-bincount-3``: Prefect keys take letters, digits and dashes): how the command line finds the run."""
    return "approve-" + re.sub(r"[^A-Za-z0-9]+", "-", version_ref).strip("-")


def approval_description(
    version: ModelVersion,
    passed: str,
    decision: Decision | None = None,
    champion: ModelVersion | None = None,
    card_uri: str | None = None,
) -> str:
    """What the reviewer's form says (markdown): which version, its scores against the champion with the evidence
    of the decision (``decision``, where a comparison was made; else the champion's registered scores), its lineage
    and a link to its model card (``card_uri``; None: no card stored)."""
    spec, metrics, dataset = version.spec, version.spec.metrics, version.spec.dataset
    group = version.group
    compared = decision is not None and decision.serving_version is not None
    lines = [f"### Approve `{version.ref}` for endpoint `{group}`?", ""]
    if not compared:
        lines += [f"**Why it is proposed**: {passed}.", ""]
    if decision is not None and decision.serving_version is not None:
        lines += [
            f"| | version | test {decision.metric} |",
            "|---|---|---|",
            f"| challenger | `{version.ref}` | {decision.challenger_score:.4f} |",
            f"| champion (serving) | `{group}:{decision.serving_version}` | {decision.serving_score:.4f} |",
            "",
            f"Both scored on the same test images (margin {decision.margin:.4f}). Evidence: {decision.reason}.",
            "",
        ]
    elif champion is not None:
        lines += [
            f"Champion `{champion.ref}` (production): registered test accuracy {champion.spec.metrics.accuracy:.4f}, "
            f"RMSE {champion.spec.metrics.rmse:.4f} (on its own test split: not a paired comparison).",
            "",
        ]
    else:
        lines += ["No champion: nothing serves this endpoint yet.", ""]
    sides = ", ".join(f"{side} {count}" for side, count in dataset.counts.items())
    card = f"[model card]({card_uri})" if card_uri else "no model card stored for this version"
    lines += [
        f"Registered test scores of `{version.ref}`: accuracy {metrics.accuracy:.4f}, RMSE {metrics.rmse:.4f}, "
        f"within one {metrics.within_one_accuracy:.4f} ({metrics.images} images).",
        "",
        "| lineage | |",
        "|---|---|",
        f"| dataset | `{dataset.split_uri}` ({sides}) |",
        f"| split sha256 | `{dataset.split_sha256}` |",
        f"| code sha256 | `{spec.code_hash}` |",
        f"| training job | `{spec.training_job}` |",
        f"| model | `{spec.model_uri}` |",
        f"| model card | {card} |",
        "",
        f"Answer here, or from a terminal: `bincount models approve {version.ref} --reason ...` (or `reject`).",
    ]
    return "\n".join(lines)


def approve_version(
    settings: Settings,
    version: ModelVersion,
    require_approval: bool,
    timeout_s: int,
    passed: str,
    decision: Decision | None = None,
    card_uri: str | None = None,
) -> ModelVersion:
    """Approve ``version``: at once when no person is asked (``passed`` says what it passed), else by the
    reviewer who resumes this paused run (in the UI or with `bincount models approve|reject`); rejected when
    nobody answers within ``timeout_s``.

    The form describes the version (:func:`approval_description`): ``decision`` is the comparison with the
    champion that proposed it, where one was made; ``card_uri`` its model card, where one is stored.
    """
    if not require_approval:
        return set_approval_task(settings, version, True, "bincount", passed)
    logger = get_run_logger()
    logger.info(
        "%s waits for approval (%s): resume this flow run in the Prefect UI, or run `bincount models approve|reject "
        "%s --reason ...`, within %d s",
        version.ref,
        passed,
        version.ref,
        timeout_s,
    )
    champion = get_model_registry(settings).production(version.group) if decision is None else None
    form = ApprovalInput.with_initial_data(
        description=approval_description(version, passed, decision, champion, card_uri)
    )
    try:
        answer = pause_flow_run(
            wait_for_input=form,
            timeout=timeout_s,
            poll_interval=APPROVAL_POLL_S,
            key=approval_pause_key(str(version.ref)),
        )
    except FlowPauseTimeout:
        return set_approval_task(settings, version, False, "bincount", f"no reviewer answered within {timeout_s} s")
    return set_approval_task(settings, version, answer.approve, answer.reviewer, answer.reason)


def waiting_approval(version_ref: str) -> FlowRun | None:
    """The paused flow run that waits for a person's answer on ``version_ref`` (its pause key names it and its
    pause has not expired); None when no run waits."""
    key = approval_pause_key(version_ref)
    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=paused)
    now = datetime.now(UTC)
    for run in runs:
        details = run.state.state_details if run.state else None
        if details is None or details.pause_key != key:
            continue
        if details.pause_timeout is not None and details.pause_timeout < now:
            continue  # the run rejects the version by itself when it next looks
        return run
    return None


def answer_waiting_approval(version_ref: str, approve: bool, reviewer: str, reason: str) -> FlowRun | None:
    """Resume the paused run that waits for a person's answer on ``version_ref`` with this answer (the run records
    it, reviewer included, as if given in the UI); returns that run, or None when no run waits."""
    run = waiting_approval(version_ref)
    if run is None:
        return None
    resume_flow_run(run.id, run_input={"approve": approve, "reviewer": reviewer, "reason": reason})
    return run


def approval_recorded(settings: Settings, version_ref: str, since: int) -> StageEvent | None:
    """The approval or rejection recorded on ``version_ref`` after its first ``since`` history entries (None: not
    yet)."""
    history = get_model_registry(settings).resolve(version_ref).history
    return next((event for event in history[since:] if event.approval is not None), None)


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
    confidence: float = PROMOTION_CONFIDENCE,
) -> Decision:
    """The challenger against what serves now (re-read), both scored as they serve on the same test images and
    compared by a paired test at ``confidence``; held when it matches a version a rollback holds."""
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
        None if serving is None else evaluate_and_publish(settings, serving.model_uri, test_channel_uri, role="serving")
    )
    decision = decide(
        endpoint_name,
        challenger,
        candidate.model_uri,
        scores,
        serving.model_uri if serving else None,
        margin,
        challenger_version=candidate.version,
        serving_version=serving.version if serving else None,
        confidence=confidence,
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
    card_uri: str | None = None,
    confidence: float = PROMOTION_CONFIDENCE,
) -> Decision:
    """Compare a registered challenger with what serves its endpoint (the group's name) and promote it if it is
    better, as one step under the endpoint's lock; every outcome is recorded, a failed deploy's too (then raised).

    With ``require_approval`` a person is asked first (without the lock held; the form shows the comparison, the
    lineage and ``card_uri``, the candidate's model card where one is stored); the comparison is made again under
    the lock against what serves then, and a promotion's reason names the reviewer.
    """
    endpoint_name = candidate.group
    reviewed: StageEvent | None = None
    if require_approval:
        first = compare_with_serving(
            settings, endpoint_name, candidate, challenger, test_channel_uri, margin, confidence
        )
        if first.outcome != "promoted":
            return conclude(settings, candidate, first)
        candidate = approve_version(
            settings, candidate, True, approval_timeout_s, first.reason, decision=first, card_uri=card_uri
        )
        reviewed = candidate.history[-1]
        if candidate.approval != "Approved":
            rejected = first.with_outcome(
                "rejected", f"{first.reason}, but {reviewed.actor} rejected it: {reviewed.reason}"
            )
            return conclude(settings, candidate, rejected)
    with endpoint_lock(endpoint_name):
        decision = compare_with_serving(
            settings, endpoint_name, candidate, challenger, test_channel_uri, margin, confidence
        )
        if decision.outcome == "promoted" and reviewed is not None:
            decision = decision.with_outcome(
                "promoted", f"{decision.reason}; approved by {reviewed.actor}: {reviewed.reason}"
            )
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


def paired_test_line(decision: Decision) -> str:
    """The statistics the decision rests on, as a paragraph (empty when no comparison was made)."""
    test = decision.comparison
    if test is None:
        return ""
    return (
        f"Paired test ({test.test}) on {test.images} test images at {100 * test.confidence:.0f}% confidence: "
        f"**{test.verdict}**; accuracy {test.differences.accuracy.points()}, RMSE {test.differences.rmse.counts()}, "
        f"within-one {test.differences.within_one.points()}; exact McNemar p={test.mcnemar.p_value:.3g}; "
        f"discordant images: {test.mcnemar.only_b} only the challenger right, {test.mcnemar.only_a} only the "
        "champion right.\n\n"
    )


def publish_decision(decision: Decision) -> None:
    """The decision as the endpoint's ``nightly-decision-<endpoint>`` artifact and a ``bincount.model.promoted`` /
    ``kept`` event about ``bincount.endpoint.<endpoint>``, named after the endpoint (the rollback automation groups
    promotions and error rates by that name; its payload says the outcome)."""
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
            f"{paired_test_line(decision)}Margin {decision.margin:.3g}. {decision.reason}."
        ),
        description=f"Nightly decision for {decision.endpoint_name}: {verdict}",
    )
    emit_event(
        event="bincount.model.promoted" if decision.promoted else "bincount.model.kept",
        resource={
            "prefect.resource.id": f"bincount.endpoint.{decision.endpoint_name}",
            "prefect.resource.name": decision.endpoint_name,
        },
        payload=decision.to_dict(),
    )
