"""The promotion step shared by the pipeline and the nightly retrain, and the deploy step the rollback shares too.

    trained model ─► already a registered model? ─► record "nothing-new"
                   ─► register-model ─► write-model-card (against what serves)
                   ─► quality gate (test accuracy >= min_accuracy; below it: rejected, recorded, raised)
                   ─► compare with what serves (paired test) ─► a person approves, where asked (no lock held)
                   ─► under the endpoint's lock: re-read what serves ─► compare ─► approve ─► deploy ─► production
                                                                                     └─── one transaction ───┘
                   ─► record the decision (every outcome, a failed deploy's too) + event + artifact
                   ─► best hyperparameters (only a version that reached production)

:func:`promote_trained` is that step; the flows hand it the trained model (:class:`Challenger`), their
rule (:class:`PromotionPolicy`) and how to deploy (:class:`DeployOptions`). The challenger is promoted
when nothing serves the endpoint, or when a paired test on the same test images finds it better than the
version that serves (``bincount.registry.decide``: exact McNemar and paired bootstrap intervals,
``margin`` a minimum gain on top; "cannot tell" keeps the serving model). The decision's artifact
(``<flow>-decision-<endpoint>``) shows both models' test scores, the paired test, and the serving
model's live accuracy on labelled traffic where the monitor has it (:func:`live_accuracy`).

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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

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
from pydantic import BaseModel, Field

from bincount.config import Settings
from bincount.contracts.registry import (
    PROMOTION_CONFIDENCE,
    PROMOTION_MARGIN,
    Decision,
    ModelVersion,
    StageEvent,
)
from bincount.contracts.serving import EndpointRecord, RolloutStrategy, ScalingConfig
from bincount.evaluation import Evaluation
from bincount.factory import get_model_registry
from bincount.monitoring import last_report
from bincount.registry import decide, decision_without_test
from bincount.storage import storage_for
from flows.data import DataOptions
from flows.train import TrainedModel, TrainOptions
from tasks.deploy import check_endpoint_task, deploy_endpoint_task, describe_endpoint_task
from tasks.evaluate import evaluate_and_publish
from tasks.model_card import model_card_task
from tasks.registry import (
    Lineage,
    find_registered_task,
    record_decision_task,
    record_rollback_task,
    register_model_task,
    set_approval_task,
    set_stage_task,
)
from tasks.train import ensure_concurrency_limit

APPROVAL_POLL_S = 2
FlowName = Literal["pipeline", "nightly"]


class QualityGateError(RuntimeError):
    """The new model scored below the bar: it was rejected and not deployed."""


@dataclass(frozen=True)
class PromotionPolicy:
    """How a flow promotes what it trained: its quality gate, the paired test's margin and confidence, and whether
    a person approves. ``by`` names the flow: the actor of the stage changes and the decision artifact's key."""

    by: FlowName
    min_accuracy: float = 0.0
    margin: float = PROMOTION_MARGIN
    confidence: float = PROMOTION_CONFIDENCE
    require_approval: bool = False
    approval_timeout_s: int = 24 * 3600


@dataclass(frozen=True)
class DeployOptions:
    """How a promoted version is deployed; None keeps the endpoint's setting (for a new endpoint: all at once, no
    capture, one replica)."""

    capture_percentage: int | None = None
    strategy: RolloutStrategy | None = None
    scaling: ScalingConfig | None = None


@dataclass(frozen=True)
class Challenger:
    """A trained model before it is registered: the model as it serves with its test scores, the split it was made
    and scored on, the test channel, and how to make it again (:func:`recipe`)."""

    trained: TrainedModel
    split_uri: str
    test_channel_uri: str
    recipe: dict[str, Any]


@dataclass(frozen=True)
class Candidate:
    """A registered challenger as the promotion judges it: its version, its scores as it serves on the test images
    (with its answer on each: the paired test needs them), where those images are, and its model card."""

    version: ModelVersion
    evaluation: Evaluation
    test_channel_uri: str
    card_uri: str | None = None


@dataclass(frozen=True)
class Promotion:
    """What the promotion step did: its decision, the version it was about (as it stands after the step), and the
    endpoint after it (None where no endpoint exists)."""

    decision: Decision
    version: ModelVersion
    endpoint: EndpointRecord | None


class LiveAccuracy(BaseModel):
    """The serving model's accuracy on labelled traffic: the monitor's last report of the endpoint."""

    accuracy: float
    labelled: int
    model_version: str | None
    window_end: str | None

    def summary(self) -> str:
        until = f" up to {self.window_end}" if self.window_end else ""
        return f"{self.accuracy:.3g} on {self.labelled} labelled requests to {self.model_version or '-'}{until}"


NO_LIVE_ACCURACY = "none: no labelled traffic in the monitor's last report"


def live_accuracy(settings: Settings, endpoint_name: str) -> LiveAccuracy | None:
    """The endpoint's live accuracy from the monitor's last report; None where it has none (never monitored, or no
    request with a label)."""
    report = last_report(storage_for(settings), settings.artifact_root, endpoint_name)
    if report is None or report.get("accuracy") is None:
        return None
    return LiveAccuracy(
        accuracy=report["accuracy"],
        labelled=report["labelled"],
        model_version=report.get("model_version"),
        window_end=report.get("window_end"),
    )


def recipe(data: DataOptions, training: TrainOptions, settings: Settings) -> dict[str, Any]:
    """How to make the model again: what a nightly run with no parameters reads back from the registry
    (``ModelVersionSpec.recipe``)."""
    return {
        "data": data.model_dump(mode="json"),
        "training": training.model_dump(mode="json"),
        "location": settings.model_dump(mode="json", include={"source_uri", "source_anonymous", "s3_endpoint_url"}),
    }


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
    deploy: DeployOptions = DeployOptions(),
) -> EndpointRecord:
    """Deploy ``version`` (as ``deploy`` says), check it and make it production in one transaction (call it under
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
            settings,
            endpoint_name,
            version.model_uri,
            str(version.ref),
            capture_percentage=deploy.capture_percentage,
            strategy=deploy.strategy,
            scaling=deploy.scaling,
        )
        check_endpoint_task(settings, endpoint_name)
        if endpoint.shadow is not None:
            logger.info("%s shadows the serving model: it becomes production when the shadow is promoted", version.ref)
            return endpoint
        if rollback:
            record_rollback_task(settings, endpoint_name, actor, reason)
        else:
            set_stage_task(settings, version, "production", actor, reason)
    return endpoint


def put_in_production(
    settings: Settings, endpoint_name: str, version: ModelVersion, reason: str, deploy: DeployOptions = DeployOptions()
) -> EndpointRecord:
    """Deploy an approved version (as ``deploy`` says, default blue/green; checked, rolled back on failure) and
    mark it production, under the endpoint's lock, with no comparison: what :func:`promote_trained` does once a
    challenger is promoted."""
    with endpoint_lock(endpoint_name):
        return deploy_version(settings, endpoint_name, version, reason, deploy=deploy)


def promote_trained(
    settings: Settings,
    endpoint_name: str,
    challenger: Challenger,
    policy: PromotionPolicy,
    deploy: DeployOptions = DeployOptions(),
    live: LiveAccuracy | None = None,
) -> Promotion:
    """The promotion step of the pipeline and the nightly (the module's diagram): a model that is a registered
    version's is recorded as nothing new (neither registered nor archived again); else it is registered with its
    model card and promoted if it passes the gate and beats what serves (:func:`promote_challenger`). ``live`` is
    shown beside the offline scores in the decision's artifact.

    Raises:
        QualityGateError: below ``policy.min_accuracy`` (rejected and recorded first).
    """
    trained = challenger.trained
    serving = serving_version(settings, endpoint_name)
    same = find_registered_task(settings, endpoint_name, trained.model_uri)
    if same is not None:
        reason = f"the challenger's model is {same.ref}'s (same sha256): nothing new, nothing registered or archived"
        decision = decision_without_test(same, serving, policy.margin, "nothing-new", reason)
        record_decision(settings, decision, policy.by, live)
        return Promotion(decision, same, describe_endpoint_task(settings, endpoint_name))
    lineage = Lineage(challenger.split_uri, trained.hyperparameters, trained.job_name, challenger.recipe)
    version = register_model_task(settings, endpoint_name, trained.model_uri, trained.evaluation, lineage)
    card_uri = model_card_task(settings, version, serving, challenger.test_channel_uri, policy.margin)
    candidate = Candidate(version, trained.evaluation, challenger.test_channel_uri, card_uri)
    decision = promote_challenger(settings, candidate, policy, deploy, live)
    registry = get_model_registry(settings)
    version = registry.get(endpoint_name, version.version)
    if version.stage == "production":  # promoted, and not a shadow still waiting
        registry.save_best_hyperparameters(
            endpoint_name, trained.hyperparameters, trained.job_name, trained.evaluation.to_dict(), version.version
        )
    return Promotion(decision, version, describe_endpoint_task(settings, endpoint_name))


def quality_gate(settings: Settings, candidate: Candidate, policy: PromotionPolicy, live: LiveAccuracy | None) -> str:
    """What the candidate passed (a sentence); below ``policy.min_accuracy`` it is rejected, the decision recorded,
    and :class:`QualityGateError` raised."""
    accuracy, bar, version = candidate.evaluation.accuracy, policy.min_accuracy, candidate.version
    if accuracy >= bar:
        return f"test accuracy {accuracy:.4f} >= min_accuracy {bar:.4f}"
    why = f"test accuracy {accuracy:.4f} < min_accuracy {bar:.4f}"
    version = set_approval_task(settings, version, False, "quality-gate", why)
    serving = serving_version(settings, version.group)
    gated = decision_without_test(version, serving, policy.margin, "rejected", f"the quality gate rejected it: {why}")
    conclude(settings, version, gated, policy.by, live)
    raise QualityGateError(
        f"test accuracy {accuracy:.3f} is below min_accuracy {bar:.3f}: {version.ref} was rejected and not deployed. "
        "Tune longer, or lower min_accuracy if this bar is too high for the data."
    )


def compare_with_serving(settings: Settings, candidate: Candidate, policy: PromotionPolicy) -> Decision:
    """The candidate against what serves its endpoint now (re-read), both scored as they serve on the same test
    images and compared by a paired test at ``policy.confidence``; held when it matches a version a rollback
    holds."""
    version, endpoint_name = candidate.version, candidate.version.group
    serving = serving_version(settings, endpoint_name)
    if serving is not None and serving.version == version.version:  # never compared with itself
        reason = f"{version.ref} already serves: nothing to compare it with"
        return decision_without_test(version, serving, policy.margin, "nothing-new", reason)
    scores = (
        None
        if serving is None
        else evaluate_and_publish(settings, serving.model_uri, candidate.test_channel_uri, role="serving")
    )
    decision = decide(
        endpoint_name,
        candidate.evaluation,
        version.model_uri,
        scores,
        serving.model_uri if serving else None,
        policy.margin,
        challenger_version=version.version,
        serving_version=serving.version if serving else None,
        confidence=policy.confidence,
    )
    held = get_model_registry(settings).held_by(endpoint_name, version.spec)
    if held is not None and held.hold is not None:
        return decision.with_outcome(
            "held",
            f"{decision.reason}; but {version.ref} matches {held.ref} (its model, or its recipe and data), held "
            f"since a rollback by {held.hold.actor} ({held.hold.reason}): a person lifts the hold with "
            f"`bincount models release-hold {held.ref} --reason ...`",
        )
    return decision.with_outcome("promoted" if decision.promoted else "kept")


def record_decision(settings: Settings, decision: Decision, by: FlowName, live: LiveAccuracy | None) -> Decision:
    """Keep ``decision`` in the registry, then show it (artifact) and emit it (event)."""
    get_run_logger().info("%s: %s", decision.outcome, decision.reason)
    record_decision_task(settings, decision)
    publish_decision(decision, by, live)
    return decision


def conclude(
    settings: Settings, version: ModelVersion, decision: Decision, by: FlowName, live: LiveAccuracy | None
) -> Decision:
    """Record a decision that did not put ``version`` in production; a version still a candidate is archived."""
    if get_model_registry(settings).get(version.group, version.version).stage == "candidate":
        set_stage_task(settings, version, "archived", by, decision.reason)
    return record_decision(settings, decision, by, live)


def promote_challenger(
    settings: Settings,
    candidate: Candidate,
    policy: PromotionPolicy,
    deploy: DeployOptions = DeployOptions(),
    live: LiveAccuracy | None = None,
) -> Decision:
    """Gate a registered challenger, compare it with what serves its endpoint (the group's name) and promote it if
    it is better, as one step under the endpoint's lock; every outcome is recorded, a failed deploy's too (then
    raised).

    With ``policy.require_approval`` a person is asked first (without the lock held; the form shows the
    comparison, the lineage and the model card); the comparison is made again under the lock against what serves
    then, and a promotion's reason names the reviewer.
    """
    version, endpoint_name = candidate.version, candidate.version.group
    passed = quality_gate(settings, candidate, policy, live)
    reviewed: StageEvent | None = None
    if policy.require_approval:
        first = compare_with_serving(settings, candidate, policy)
        if first.outcome != "promoted":
            return conclude(settings, version, first, policy.by, live)
        version = approve_version(
            settings,
            version,
            True,
            policy.approval_timeout_s,
            f"{passed}; {first.reason}",
            decision=first,
            card_uri=candidate.card_uri,
        )
        reviewed = version.history[-1]
        if version.approval != "Approved":
            rejected = first.with_outcome(
                "rejected", f"{first.reason}, but {reviewed.actor} rejected it: {reviewed.reason}"
            )
            return conclude(settings, version, rejected, policy.by, live)
    with endpoint_lock(endpoint_name):
        decision = compare_with_serving(settings, candidate, policy)
        if decision.outcome == "promoted" and reviewed is not None:
            decision = decision.with_outcome(
                "promoted", f"{decision.reason}; approved by {reviewed.actor}: {reviewed.reason}"
            )
        if decision.outcome != "promoted":
            return conclude(settings, version, decision, policy.by, live)
        if version.approval != "Approved":
            version = approve_version(
                settings, version, False, policy.approval_timeout_s, f"{passed}; {decision.reason}"
            )
        try:
            deploy_version(settings, endpoint_name, version, f"{policy.by}: {decision.reason}", deploy=deploy)
        except Exception as error:
            failed = decision.with_outcome(
                "deploy-failed", f"{decision.reason}; but its deploy failed, what served still serves: {error}"
            )
            conclude(settings, version, failed, policy.by, live)
            raise
        return record_decision(settings, decision, policy.by, live)


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


def decision_artifact_key(by: FlowName, endpoint_name: str) -> str:
    return f"{by}-decision-{endpoint_name.lower()}"


def version_name(decision: Decision, version: int | None) -> str:
    return "-" if version is None else f"{decision.endpoint_name}:{version}"


def publish_decision(decision: Decision, by: FlowName, live: LiveAccuracy | None = None) -> None:
    """The decision as the endpoint's ``<by>-decision-<endpoint>`` artifact (``nightly-decision-bincount``): the
    offline scores of both models with the paired test, and the serving model's live accuracy beside them where the
    monitor has it; and a ``bincount.model.promoted`` / ``kept`` event about ``bincount.endpoint.<endpoint>``,
    named after the endpoint (the rollback automation groups promotions and error rates by that name; its payload
    says the outcome)."""
    verdict = {
        "promoted": "promoted",
        "held": "held: not promoted without a person",
        "rejected": "rejected",
        "deploy-failed": "its deploy failed",
        "nothing-new": "nothing new",
        "unchanged": "nothing retrained",
    }.get(decision.outcome, "kept the serving model")
    serving = "-" if decision.serving_score is None else f"{decision.serving_score:.3g}"
    serving_live = live.summary() if live else NO_LIVE_ACCURACY
    title = {"pipeline": "Pipeline run", "nightly": "Nightly retrain"}[by]
    create_markdown_artifact(
        key=decision_artifact_key(by, decision.endpoint_name),
        markdown=(
            f"### {title} of `{decision.endpoint_name}`: {verdict}\n\n"
            f"| | version | test {decision.metric} | live accuracy (labelled traffic) |\n|---|---|---|---|\n"
            f"| challenger | `{version_name(decision, decision.challenger_version)}` | "
            f"{decision.challenger_score:.3g} | - (not serving) |\n"
            f"| serving | `{version_name(decision, decision.serving_version)}` | {serving} | {serving_live} |\n\n"
            f"{paired_test_line(decision)}Margin {decision.margin:.3g}. {decision.reason}."
        ),
        description=f"{title} decision for {decision.endpoint_name}: {verdict}",
    )
    emit_event(
        event="bincount.model.promoted" if decision.promoted else "bincount.model.kept",
        resource={
            "prefect.resource.id": f"bincount.endpoint.{decision.endpoint_name}",
            "prefect.resource.name": decision.endpoint_name,
        },
        payload=decision.to_dict(),
    )


def decision_figures(decision: Decision, live: LiveAccuracy | None) -> dict[str, str | float | None]:
    """A run summary's key figures of a decision: the outcome, both models' offline scores and their paired test,
    and the serving model's live accuracy."""
    retrained = decision.outcome != "unchanged"
    figures: dict[str, str | float | None] = {
        "decision": decision.outcome or ("promoted" if decision.promoted else "kept the serving model"),
        "reason": decision.reason,
        "challenger": (
            f"{version_name(decision, decision.challenger_version)}, test {decision.metric} "
            f"{decision.challenger_score:.3g}"
            if retrained
            else "nothing retrained"
        ),
        f"serving ({version_name(decision, decision.serving_version)}) test {decision.metric}": decision.serving_score,
    }
    comparison = decision.comparison
    if comparison is not None:
        test = comparison.mcnemar
        figures["paired test"] = (
            f"{comparison.verdict}: exact McNemar p={test.p_value:.3g} on {comparison.images} images; discordant: "
            f"{test.only_b} only the challenger right, {test.only_a} only the serving model right"
        )
        figures[f"accuracy gain ({100 * comparison.confidence:.0f}% interval)"] = (
            comparison.differences.accuracy.points()
        )
    figures["serving live accuracy"] = live.summary() if live else NO_LIVE_ACCURACY
    return figures
