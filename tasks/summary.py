"""The run summary: one markdown artifact on a top-level flow run's own page that tells its story.

A flow hook (on completion and on failure) reads the run's stages back from the Prefect API (its task
runs and subflow runs, each with state and duration, every subflow linked with the artifacts made
under it) and puts them beside the key figures the flow's result holds (accuracy, model version,
endpoint and its URL, decision...). The key is stable per flow (``summary-<flow name>``), so the
artifact's history lists every run. Subflow runs get none: their parent's summary links them.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prefect import Flow, get_client
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)
from prefect.client.schemas.objects import Artifact, FlowRun, State, TaskRun
from prefect.client.schemas.sorting import TaskRunSort
from prefect.logging import get_logger
from prefect.settings import get_current_settings

from tasks.artifacts import markdown_table

Figures = Callable[[Any], dict[str, Any]]
"""What a flow's result says in a line each: label -> value (numbers are shown with 3 significant digits)."""

logger = get_logger("bincount.summary")


def summary_key(flow_name: str) -> str:
    return f"summary-{flow_name.lower()}"


def ui_link(text: str, path: str) -> str:
    """A markdown link into the Prefect UI, or plain text when no UI URL is configured."""
    base = get_current_settings().ui_url
    return f"[{text}]({base.rstrip('/')}/{path})" if base else text


def duration(start: dt.datetime | None, end: dt.datetime | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    return f"{seconds:.3g} s" if seconds < 100 else f"{seconds / 60:.3g} min"


def descendants(client: SyncPrefectClient, run_id: UUID) -> list[FlowRun]:
    """Every flow run under ``run_id`` (subflows of subflows too)."""
    found: list[FlowRun] = []
    pending = [run_id]
    while pending:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pending.pop()]))
        )
        found += children
        pending += [child.id for child in children]
    return found


def artifacts_of(client: SyncPrefectClient, run_ids: list[UUID]) -> list[Artifact]:
    """The keyed artifacts made in these flow runs (progress bars left out), oldest first."""
    artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids)))
    return sorted((a for a in artifacts if a.key and a.type != "progress"), key=lambda a: a.created or dt.datetime.min)


def artifact_links(artifacts: list[Artifact]) -> str:
    return ", ".join(ui_link(a.key, f"artifacts/artifact/{a.id}") for a in artifacts)


def settled_task_runs(client: SyncPrefectClient, flow_run_id: UUID, wait_s: float = 5.0) -> list[TaskRun]:
    """The flow run's task runs once the server has them all: their states arrive as events, recorded a
    moment after the flow's own final state (the same runs, all final, twice in a row; at most ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    seen = None
    while True:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )
        now = [(run.id, run.state_type) for run in task_runs]
        if (
            now == seen and all(run.state and run.state.is_final() for run in task_runs)
        ) or time.monotonic() > deadline:
            return task_runs
        seen = now
        time.sleep(0.5)


def stage_rows(client: SyncPrefectClient, flow_run: FlowRun) -> list[str]:
    """One table row per task run and subflow run of ``flow_run``, in the order they started."""
    task_runs = settled_task_runs(client, flow_run.id)
    subflows = {
        child.parent_task_run_id: child
        for child in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id]))
        )
    }
    own: dict[UUID | None, list[Artifact]] = {}
    for artifact in artifacts_of(client, [flow_run.id]):
        own.setdefault(artifact.task_run_id, []).append(artifact)
    rows = []
    for task_run in task_runs:
        name = task_run.name.rsplit("-", 1)[0]
        child = subflows.get(task_run.id)
        if child is None:
            links = artifact_links(own.get(task_run.id, []))
            rows.append(
                f"| {name} | {task_run.state_name} | {duration(task_run.start_time, task_run.end_time)} | {links} |"
            )
            continue
        under = artifacts_of(client, [child.id] + [run.id for run in descendants(client, child.id)])
        name = ui_link(f"{name} ({child.name})", f"runs/flow-run/{child.id}")
        rows.append(
            f"| {name} | {child.state_name} | {duration(child.start_time, child.end_time)} | {artifact_links(under)} |"
        )
    return rows


def summary_markdown(flow: Flow, flow_run: FlowRun, state: State, figures: dict[str, Any], stages: list[str]) -> str:
    verdict = state.name if state.is_completed() else f"{state.name}: {state.message or 'no message'}"
    lines = [f"### {flow.name} `{flow_run.name}`: {verdict}", ""]
    if figures:
        lines += [markdown_table(["key figure", "value"], list(figures.items()))]
    lines += ["| stage | state | duration | artifacts |", "|---|---|---|---|", *stages]
    return "\n".join(lines) + "\n"


def run_summary(figures: Figures) -> Callable[[Flow, FlowRun, State], None]:
    """A flow hook for ``on_completion`` and ``on_failure``: publishes the run's summary artifact
    (top-level runs only). ``figures`` reads the key figures from the flow's result."""

    def publish(flow: Flow, flow_run: FlowRun, state: State) -> None:
        if flow_run.parent_task_run_id is not None:
            return
        result = state.result(raise_on_failure=False) if state.is_completed() else None
        key_figures = figures(result) if result is not None else {}
        with get_client(sync_client=True) as client:
            markdown = summary_markdown(flow, flow_run, state, key_figures, stage_rows(client, flow_run))
            client.create_artifact(
                ArtifactCreate(
                    key=summary_key(flow.name),
                    type="markdown",
                    data=markdown,
                    flow_run_id=flow_run.id,
                    description=f"What {flow.name} run {flow_run.name} did: {state.name}",
                )
            )
        logger.debug("Published %s for %s", summary_key(flow.name), flow_run.name)

    return publish
