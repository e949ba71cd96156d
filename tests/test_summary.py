"""The run summary artifact on a real Prefect server: stages, links to subflows and their artifacts, failures."""

from __future__ import annotations

import pytest
from prefect import flow, get_client, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.filters import (
    ArtifactCollectionFilter,
    ArtifactCollectionFilterKey,
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from tasks.artifacts import markdown_table
from tasks.summary import run_summary, summary_key


@task(name="count-items")
def count_items(n: int) -> int:
    create_markdown_artifact(key="item-count", markdown=f"{n} items")
    return n


@flow(name="count-subflow")
def count_subflow(n: int) -> int:
    return count_items(n)


def figures(result: int) -> dict[str, float | int]:
    return {"items": result, "share": result / 3}


SUMMARY = run_summary(figures)


@flow(name="summary-demo", on_completion=[SUMMARY], on_failure=[SUMMARY])
def summary_demo(n: int) -> int:
    if n < 0:
        raise ValueError("n must not be negative")
    return count_subflow(n) + count_items(n)


def latest(key: str) -> str:
    with get_client(sync_client=True) as client:
        (found,) = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(key=ArtifactCollectionFilterKey(any_=[key]))
        )
    return str(found.data)


def test_summary_lists_stages_figures_and_subflow_artifacts_and_failures(prefect_server: None) -> None:
    state = summary_demo(2, return_state=True)
    with get_client(sync_client=True) as client:  # filtered on the server: the session's server holds many artifacts
        summary = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[summary_key("summary-demo")]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert len(summary) == 1, "one summary, on the top-level run's own page (none on the subflow)"
    text = str(summary[0].data)
    assert "| items | 4 |" in text and "| share | 1.33 |" in text, text
    assert "count-subflow (" in text and "/runs/flow-run/" in text and "[item-count](" in text, text
    assert "| count-items | Completed |" in text and text.count("[item-count](") == 2, text

    with pytest.raises(ValueError, match="n must not be negative"):
        summary_demo(-1)
    failed = latest(summary_key("summary-demo"))
    assert "Failed" in failed and "n must not be negative" in failed, failed
    with get_client(sync_client=True) as client:
        history = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[summary_key("summary-demo")]))
        )
    assert len(history) == 2, "the stable key keeps every run's summary"


def test_tables_show_numbers_for_people_and_keep_their_shape() -> None:
    table = markdown_table(["lr", "failure"], [[0.012345678912345678, "exit 1 | see log\nline two"], [None, 3]])
    assert table.splitlines()[2] == "| 0.0123 | exit 1 \\| see log line two |" and "| - | 3 |" in table


@task(name="resolve-host", retries=0)
def resolve_host() -> None:
    raise ConnectionError("no-such-host.invalid: Name or service not known")


@flow(name="resolve-subflow")
def resolve_subflow() -> None:
    resolve_host()


@flow(name="resolve-demo")
def resolve_demo() -> None:
    resolve_subflow()


def test_one_failure_is_logged_with_one_traceback(prefect_server: None, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConnectionError):
        resolve_demo()
    failures = [
        r for r in caplog.records if r.name.startswith("prefect.") and "Name or service not known" in r.getMessage()
    ]
    with_traceback = [r for r in failures if r.exc_info]
    assert len(with_traceback) == 1 and with_traceback[0].name == "prefect.task_runs", [
        r.getMessage() for r in with_traceback
    ]
    assert sum(r.levelname == "ERROR" for r in failures) >= 3, "each level still says, in one line, that it failed"
