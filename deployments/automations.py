"""Automations that act on the project's events, created in code (``python -m deployments.setup --automations``).

    bincount.monitor.drift-detected                        ─► run harvest-feedback/daily for it (then_retrain)
    bincount.feedback.harvested (bincount.retrain = true)  ─► run nightly-retrain/nightly on the latest data
    nightly-retrain or bincount-pipeline Failed / Crashed  ─► notification (webhook block)
    no nightly-retrain Completed within 26 h               ─► notification
    bincount.model.promoted, then bincount.monitor.error-rate-high within 24 h, both about the same endpoint
                                                           ─► run rollback-model/on-demand for that endpoint

Each is replaced by name when created again (idempotent). The deployments must exist first
(`prefect deploy --all`): the actions name them by id. A notification links to the run (or the
deployment) in the Prefect UI at the address given when it was created (``Notify.ui_url``): the server
renders the message and knows no address of its own unless started with ``PREFECT_UI_URL``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

from prefect import get_client
from prefect.automations import (
    Automation,
    EventTrigger,
    Posture,
    RunDeployment,
    SendNotification,
)
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.exceptions import ObjectNotFound

NOTIFY_BLOCK = "bincount-notify"
WATCHED_FLOWS = ["nightly-retrain", "bincount-pipeline"]
NIGHTLY = "nightly-retrain/nightly"
ROLLBACK = "rollback-model/on-demand"
HARVEST = "harvest-feedback/daily"
# Created by earlier versions and replaced by the feedback chain (drift straight to the nightly): deleted on
# setup, or a drift would retrain twice.
RETIRED = ["bincount-drift-retrain"]


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


@dataclass(frozen=True)
class Notify:
    """Where notifications go (the webhook block's id) and the Prefect UI their links open (``http(s)://...``)."""

    block_id: UUID
    ui_url: str

    def run_body(self) -> str:
        return (
            "Flow run {{ flow_run.name }} of {{ flow.name }} entered {{ flow_run.state.name }}: "
            "{{ flow_run.state.message }}\n"
            f"{self.ui_url}/runs/flow-run/{{{{ flow_run.id }}}}"
        )


def ui_address(ui_url: str | None) -> str:
    """The Prefect UI's address for links, checked; ``ui_url`` None: not known (the error says how to give it)."""
    if not ui_url:
        raise AutomationSetupError(
            "notifications link to the run in the Prefect UI, whose address is not known here: set PREFECT_API_URL "
            "to the server's API (e.g. http://127.0.0.1:4200/api; the UI is that address without /api), or "
            "PREFECT_UI_URL, or give --ui-url"
        )
    if not ui_url.startswith(("http://", "https://")):
        raise AutomationSetupError(f"the Prefect UI's address must start with http:// or https://, not {ui_url!r}")
    return ui_url.rstrip("/")


def rollback_trigger(window_h: float) -> EventTrigger:
    """``bincount.model.promoted`` opens a window of ``window_h`` hours for its endpoint; the monitor's
    ``bincount.monitor.error-rate-high`` about the same endpoint within it fires (once per promotion).

    Per endpoint through ``for_each`` on the resource's name: a model group is named after its endpoint, so the
    promotion (about ``bincount.model-group.<name>``) and the error rate (``bincount.endpoint.<name>``) fall in
    the same bucket only when they are about the same endpoint. (A sequence of two triggers would not do: its
    steps are not kept per resource, so a promotion on one endpoint and errors on another would fire it.)
    """
    return EventTrigger(
        after={"bincount.model.promoted"},
        expect={"bincount.monitor.error-rate-high"},
        match={"prefect.resource.id": ["bincount.model-group.*", "bincount.endpoint.*"]},
        for_each={"prefect.resource.name"},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(hours=window_h),
    )


def automations(
    notify: Notify | None, retune_on_drift: bool, missed_after_h: float, rollback_window_h: float
) -> list[Automation]:
    """The automations, not yet created (no notification ones without a block)."""
    found = [
        *feedback_chain_automations(retune_on_drift),
        Automation(
            name="bincount-error-rate-rollback",
            description="A promotion followed by the monitor's error-rate-high on the same endpoint: roll it back.",
            trigger=rollback_trigger(rollback_window_h),
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
    if notify is not None:
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
                        block_document_id=notify.block_id,
                        subject="bincount: {{ flow.name }} {{ flow_run.state.name }}",
                        body=notify.run_body(),
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
                        block_document_id=notify.block_id,
                        subject="bincount: no nightly retrain completed",
                        body=f"No nightly-retrain run has completed in the last {missed_after_h:g} hours: "
                        f"{notify.ui_url}/deployments/deployment/{_deployment_id(NIGHTLY)}",
                    )
                ],
            ),
        ]
    return found


def create_automations(
    notify_url: str | None,
    retune_on_drift: bool = False,
    missed_after_h: float = 26.0,
    rollback_window_h: float = 24.0,
    ui_url: str | None = None,
) -> list[str]:
    """Create (or replace) every automation; return their names. With ``notify_url``, ``ui_url`` is the Prefect
    UI's address that the notifications link into (required: :func:`ui_address` says how to give it)."""
    notify = None
    if notify_url:
        ui = ui_address(ui_url)  # before anything is saved
        notify = Notify(save_webhook_block(notify_url), ui)
    created = []
    with get_client(sync_client=True) as client:
        for name in RETIRED:
            for old in client.read_automations_by_name(name):
                client.delete_automation(old.id)
        for automation in automations(notify, retune_on_drift, missed_after_h, rollback_window_h):
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            automation.create()
            created.append(automation.name)
    return created


def feedback_chain_automations(retune: bool = False) -> list[Automation]:
    """The drift chain with feedback, not yet created: drift ─► harvest-feedback ─► nightly-retrain.

    ``bincount-drift-harvest``: the monitor's ``bincount.monitor.drift-detected`` about an endpoint runs
    ``harvest-feedback/daily`` for it, asking for a retrain after; ``bincount-harvested-retrain``: that harvest's
    ``bincount.feedback.harvested`` (resource label ``bincount.retrain`` = ``true``; a scheduled harvest's says
    ``false`` and starts nothing) runs ``nightly-retrain/nightly`` for the endpoint, which then trains on the
    dataset's latest manifest version.
    """
    return [
        Automation(
            name="bincount-drift-harvest",
            description="Drift detected by the monitor: harvest the labelled traffic, then retrain.",
            trigger=EventTrigger(
                expect={"bincount.monitor.drift-detected"},
                match={"prefect.resource.id": "bincount.endpoint.*"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[
                RunDeployment(
                    source="selected",
                    deployment_id=_deployment_id(HARVEST),
                    parameters={"endpoint_name": "{{ event.resource['prefect.resource.name'] }}", "then_retrain": True},
                )
            ],
        ),
        Automation(
            name="bincount-harvested-retrain",
            description="A harvest started by drift finished: retrain on the dataset's latest manifest version.",
            trigger=EventTrigger(
                expect={"bincount.feedback.harvested"},
                match={"prefect.resource.id": "bincount.dataset.*", "bincount.retrain": "true"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[
                RunDeployment(
                    source="selected",
                    deployment_id=_deployment_id(NIGHTLY),
                    parameters={"endpoint_name": "{{ event.resource['bincount.endpoint'] }}", "retune": retune},
                )
            ],
        ),
    ]
