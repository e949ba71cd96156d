"""Tasks: register a trained model, change its approval and stage; each change is an event and refreshes the
``model-registry-<group>`` table artifact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run

from bincount.code import code_hash
from bincount.config import Settings
from bincount.contracts.registry import (
    Decision,
    ModelMetrics,
    ModelVersion,
    ModelVersionSpec,
    Stage,
)
from bincount.evaluation import Evaluation
from bincount.factory import get_model_registry
from bincount.monitoring import store_baseline
from bincount.registry import dataset_ref, object_sha256
from bincount.storage import storage_for
from tasks.retry import is_transient

ModelEvent = Literal["registered", "approved", "rejected", "promoted", "archived", "rolled-back", "hold-released"]


def run_page() -> str | None:
    """This flow run's page in the UI; None where no UI address is known (a temporary server)."""
    url = flow_run.ui_url
    return url if url and url.startswith("http") else None


def registry_artifact_key(group: str) -> str:
    return f"model-registry-{group.lower()}"


def emit_model_event(kind: ModelEvent, version: ModelVersion, payload: dict[str, Any] | None = None) -> None:
    """``bincount.model.<kind>`` about the model group, with the version as a related resource."""
    emit_event(
        event=f"bincount.model.{kind}",
        resource={
            "prefect.resource.id": f"bincount.model-group.{version.group}",
            "prefect.resource.name": version.group,
        },
        related=[
            {
                "prefect.resource.id": f"bincount.model-version.{version.group}.{version.version}",
                "prefect.resource.role": "model-version",
                "prefect.resource.name": str(version.ref),
            }
        ],
        payload={"version": str(version.ref), "stage": version.stage, "approval": version.approval, **(payload or {})},
    )


def publish_registry(settings: Settings, group: str) -> None:
    """Every version of ``group`` as a table artifact (newest first), refreshed after each change."""
    rows = [
        {
            "version": str(version.ref),
            "stage": version.stage,
            "approval": version.approval,
            "test accuracy": f"{version.spec.metrics.accuracy:.3g}",
            "RMSE": f"{version.spec.metrics.rmse:.3g}",
            "dataset": version.spec.dataset.split_uri.rsplit("/", 2)[-2],
            "training job": version.spec.training_job,
            "created": version.created_at[:19].replace("T", " "),
            "last change": version.history[-1].reason if version.history else "registered",
            "hold": f"held by {version.hold.actor}: {version.hold.reason}" if version.hold else "-",
        }
        for version in reversed(get_model_registry(settings).list(group))
    ]
    create_table_artifact(key=registry_artifact_key(group), table=rows, description=f"Model registry: group {group}")


@dataclass(frozen=True)
class Lineage:
    """How a trained model was made, as the flow knows it; the task adds what it reads itself (the model's and the
    split's sha256, the code's hash, the flow run)."""

    split_uri: str
    hyperparameters: dict[str, Any]
    """Every train.py flag the job ran with."""
    training_job: str
    recipe: dict[str, Any]
    """The rest of how to make it again: the flow's data and training options and the data source."""


@task(name="register-model", retries=2, retry_delay_seconds=10, retry_condition_fn=is_transient, cache_policy=NO_CACHE)
def register_model_task(
    settings: Settings, group: str, model_uri: str, evaluation: Evaluation, lineage: Lineage
) -> ModelVersion:
    """Register a trained model as the next version of ``group`` (PendingManualApproval), with its lineage.

    A retry finds the version the first attempt registered (same model URI and sha256).
    """
    storage = storage_for(settings)
    sha256 = object_sha256(storage, model_uri)
    spec = ModelVersionSpec(
        model_uri=model_uri,
        model_sha256=sha256,
        metrics=ModelMetrics.from_dict(evaluation.to_dict()),
        dataset=dataset_ref(storage, lineage.split_uri),
        code_hash=code_hash(),
        hyperparameters=lineage.hyperparameters,
        training_job=lineage.training_job,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        flow_run_url=run_page(),
        created_by=f"flow run {flow_run.name}" if flow_run.name else "bincount",
        recipe=lineage.recipe,
        baseline_uri=store_baseline(
            storage,
            settings.artifact_uri("registry", group, "baselines", f"{sha256[:16]}.json"),
            lineage.split_uri,
            model_uri,
        ),
    )
    version = get_model_registry(settings).register(group, spec)
    get_run_logger().info("Registered %s: %s (test accuracy %.4f)", version.ref, model_uri, spec.metrics.accuracy)
    emit_model_event("registered", version, {"model_uri": model_uri, "accuracy": spec.metrics.accuracy})
    publish_registry(settings, group)
    return version


@task(
    name="find-registered-model",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=is_transient,
    cache_policy=NO_CACHE,
)
def find_registered_task(settings: Settings, group: str, model_uri: str) -> ModelVersion | None:
    """The version of ``group`` whose model has the digest of the one at ``model_uri`` (None: a new model)."""
    found = get_model_registry(settings).find_by_digest(group, object_sha256(storage_for(settings), model_uri))
    if found is not None:
        get_run_logger().info("%s is %s's model (same sha256): nothing new", model_uri, found.ref)
    return found


@task(name="set-model-approval", cache_policy=NO_CACHE)
def set_approval_task(
    settings: Settings, version: ModelVersion, approved: bool, actor: str, reason: str
) -> ModelVersion:
    """Approve or reject ``version`` (who and why are kept in its history)."""
    registry = get_model_registry(settings)
    change = registry.approve if approved else registry.reject
    updated = change(version.group, version.version, actor, reason)
    get_run_logger().info("%s %s by %s: %s", "Approved" if approved else "Rejected", version.ref, actor, reason)
    emit_model_event("approved" if approved else "rejected", updated, {"actor": actor, "reason": reason})
    publish_registry(settings, version.group)
    return updated


@task(name="set-model-stage", cache_policy=NO_CACHE)
def set_stage_task(settings: Settings, version: ModelVersion, stage: Stage, actor: str, reason: str) -> ModelVersion:
    """Move ``version`` to ``stage``; to production, the version it replaces is archived."""
    updated = get_model_registry(settings).transition(version.group, version.version, stage, actor, reason)
    get_run_logger().info("%s is %s: %s", version.ref, stage, reason)
    emit_model_event("promoted" if stage == "production" else "archived", updated, {"actor": actor, "reason": reason})
    publish_registry(settings, version.group)
    return updated


@task(name="release-hold", cache_policy=NO_CACHE)
def release_hold_task(settings: Settings, version: ModelVersion, actor: str, reason: str) -> ModelVersion:
    """A person lifts the hold a rollback put on ``version``: it (and models like it) may be promoted again."""
    updated = get_model_registry(settings).release_hold(version.group, version.version, actor, reason)
    get_run_logger().info("%s is no longer held (released by %s: %s)", version.ref, actor, reason)
    emit_model_event("hold-released", updated, {"actor": actor, "reason": reason})
    publish_registry(settings, version.group)
    return updated


@task(
    name="record-decision",
    retries=3,
    retry_delay_seconds=[1, 10, 30],
    retry_condition_fn=is_transient,
    cache_policy=NO_CACHE,
)
def record_decision_task(settings: Settings, decision: Decision) -> Decision:
    """Keep a promotion decision in the registry (a transient storage fault is retried: no decision is lost)."""
    get_model_registry(settings).record(decision)
    get_run_logger().info("Decision on %s recorded: %s (%s)", decision.endpoint_name, decision.outcome, decision.reason)
    return decision


@task(name="record-rollback", cache_policy=NO_CACHE)
def record_rollback_task(settings: Settings, group: str, actor: str, reason: str) -> ModelVersion:
    """Put the previous production version back in production in the registry (after it was deployed again)."""
    registry = get_model_registry(settings)
    rolled_from = registry.production(group)
    restored = registry.rollback(group, actor, reason)
    get_run_logger().info(
        "%s is in production again (was %s): %s", restored.ref, rolled_from.ref if rolled_from else "-", reason
    )
    emit_model_event(
        "rolled-back",
        restored,
        {"actor": actor, "reason": reason, "rolled_back_from": str(rolled_from.ref) if rolled_from else None},
    )
    publish_registry(settings, group)
    return restored
