"""Automations that act on the project's events, created in code (``python -m deployments.setup --automations``).

    bincount.monitor.drift-detected                        ─► run nightly-retrain/nightly now (retune if asked)
    nightly-retrain or bincount-pipeline Failed / Crashed  ─► notification (webhook block)
    no nightly-retrain Completed within 26 h               ─► notification
    bincount.model.promoted, then bincount.monitor.error-rate-high within 24 h
                                                           ─► run rollback-model/on-demand

Each is replaced by name when created again (idempotent). The deployments must exist first
(`prefect deploy --all`): the actions name them by id.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect import get_client
from prefect.automations import (
    Automation,
    EventTrigger,
    Posture,
    RunDeployment,
    SendNotification,
    SequenceTrigger,
)
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.exceptions import ObjectNotFound

NOTIFY_BLOCK = "bincount-notify"
WATCHED_FLOWS = ["nightly-retrain", "bincount-pipeline"]
NIGHTLY = "nightly-retrain/nightly"
ROLLBACK = "rollback-model/on-demand"


class AutomationSetupError(RuntimeError):
    """The automations cannot be created as asked; the message says what to do first."""


def save_webhook_block(url: str) -> UUID:
    """The notification block every alert goes through: a JSON POST of subject and body to ``url``."""
    block = CustomWebhookNotificationBlock(
        name="bincount",
        url=url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "{{name}}"},
    )
    return block.save(NOTIFY_BLOCK, overwrite=True)


def _deployment_id(name: str) -> UUID:
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name).id
        except ObjectNotFound:
            raise AutomationSetupError(
                f"deployment {name!r} does not exist yet: run `prefect deploy --all` first"
            ) from None


def _flow_runs_of(flows: list[str]) -> dict[str, object]:
    return {"prefect.resource.role": "flow", "prefect.resource.name": flows}


_RUN_BODY = (
    "Flow run {{ flow_run.name }} of {{ flow.name }} entered {{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
    "{{ flow_run|ui_url }}"
)


def automations(
    notify_block_id: UUID | None, retune_on_drift: bool, missed_after_h: float, rollback_window_h: float
) -> list[Automation]:
    """The automations, not yet created (no notification ones without a block)."""
    found = [
        Automation(
            name="bincount-drift-retrain",
            description="Drift detected by the monitor: retrain now.",
            trigger=EventTrigger(
                expect={"bincount.monitor.drift-detected"},
                match={"prefect.resource.id": "bincount.endpoint.*"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[
                RunDeployment(
                    source="selected",
                    deployment_id=_deployment_id(NIGHTLY),
                    parameters={
                        "endpoint_name": "{{ event.resource['prefect.resource.name'] }}",
                        "retune": retune_on_drift,
                    },
                )
            ],
        ),
        Automation(
            name="bincount-error-rate-rollback",
            description="A promotion followed by an error rate above the monitor's max_error_rate: roll back.",
            trigger=SequenceTrigger(
                triggers=[
                    EventTrigger(
                        expect={"bincount.model.promoted"}, match={"prefect.resource.id": "bincount.model-group.*"}
                    ),
                    EventTrigger(
                        expect={"bincount.monitor.error-rate-high"},
                        match={"prefect.resource.id": "bincount.endpoint.*"},
                    ),
                ],
                within=timedelta(hours=rollback_window_h),
            ),
            actions=[
                RunDeployment(
                    source="selected",
                    deployment_id=_deployment_id(ROLLBACK),
                    parameters={
                        "endpoint_name": "{{ event.resource['prefect.resource.name'] }}",
                        "reason": "error rate above the threshold after a promotion",
                        "actor": "automation",
                    },
                )
            ],
        ),
    ]
    if notify_block_id is not None:
        found += [
            Automation(
                name="bincount-run-failed",
                description="A nightly or pipeline run failed or crashed: tell someone.",
                trigger=EventTrigger(
                    expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                    match={"prefect.resource.id": "prefect.flow-run.*"},
                    match_related=_flow_runs_of(WATCHED_FLOWS),
                    posture=Posture.Reactive,
                    threshold=1,
                ),
                actions=[
                    SendNotification(
                        block_document_id=notify_block_id,
                        subject="bincount: {{ flow.name }} {{ flow_run.state.name }}",
                        body=_RUN_BODY,
                    )
                ],
            ),
            Automation(
                name="bincount-nightly-missed",
                description=f"No nightly-retrain run completed within {missed_after_h:g} h: tell someone.",
                trigger=EventTrigger(
                    expect={"prefect.flow-run.Completed"},
                    match={"prefect.resource.id": "prefect.flow-run.*"},
                    match_related=_flow_runs_of(["nightly-retrain"]),
                    posture=Posture.Proactive,
                    threshold=1,
                    within=timedelta(hours=missed_after_h),
                ),
                actions=[
                    SendNotification(
                        block_document_id=notify_block_id,
                        subject="bincount: no nightly retrain completed",
                        body=f"No nightly-retrain run has completed in the last {missed_after_h:g} hours.",
                    )
                ],
            ),
        ]
    return found


def create_automations(
    notify_url: str | None, retune_on_drift: bool = False, missed_after_h: float = 26.0, rollback_window_h: float = 24.0
) -> list[str]:
    """Create (or replace) every automation; return their names."""
    block_id = save_webhook_block(notify_url) if notify_url else None
    created = []
    with get_client(sync_client=True) as client:
        for automation in automations(block_id, retune_on_drift, missed_after_h, rollback_window_h):
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            automation.create()
            created.append(automation.name)
    return created
