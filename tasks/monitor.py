"""Tasks: monitor one endpoint's captured traffic against its model's baseline; publish the verdict and emit it.

Events: ``bincount.monitor.drift-detected`` or ``bincount.monitor.ok`` (and ``bincount.monitor.inconclusive``
with no traffic or no baseline), plus ``bincount.monitor.error-rate-high`` (sent first) when the model's error rate
(its 5xx, never the callers' 4xx) passes ``max_error_rate``, about the endpoint, with the model version as a related
resource; the payload carries the figures (error rate, PSI, drifted features, live accuracy) automations can
filter on.
"""

from __future__ import annotations

import datetime as dt

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from bincount.capture import CaptureReader, capture_prefix
from bincount.config import Settings
from bincount.contracts.registry import parse_reference
from bincount.contracts.serving import EndpointNotFoundError
from bincount.endpoints import EndpointRecords
from bincount.factory import get_invocation_metrics, get_model_registry
from bincount.monitoring import (
    DriftThresholds,
    MonitorReport,
    TrafficWindow,
    ground_truth,
    load_baseline,
    monitor_window,
    read_cursor,
    save_report,
)
from bincount.plots import monitor_plot
from bincount.registry import now_iso
from bincount.storage import storage_for
from tasks.artifacts import publish_plot
from tasks.deploy import publish_endpoint
from tasks.retry import is_transient

EVENTS = {"drift": "bincount.monitor.drift-detected", "ok": "bincount.monitor.ok"}


def monitor_artifact_key(endpoint: str) -> str:
    return f"monitor-{endpoint.lower()}"


@task(
    name="monitor-endpoint-traffic",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=is_transient,
    cache_policy=NO_CACHE,
)
def monitor_traffic_task(
    settings: Settings,
    endpoint: str,
    thresholds: DriftThresholds,
    labels_uri: str | None,
    first_window_hours: float = 24.0,
) -> MonitorReport:
    """Read ``endpoint``'s capture since the last run (a first run: the last ``first_window_hours`` at most) as a
    stream, compare it with the served version's baseline, save the report and move the cursor past what was read.

    Labels come from ``labels_uri``, else the bucket the served version was trained from, else the data source.
    Where the platform counts invocations itself (``aws``: CloudWatch), the error rate is its.
    """
    logger = get_run_logger()
    storage = storage_for(settings)
    record = EndpointRecords(settings, storage).read(endpoint)
    if record is None:
        raise EndpointNotFoundError(f"no endpoint named {endpoint!r} is recorded under {settings.artifact_root}")
    after = read_cursor(storage, settings.artifact_root, endpoint)
    since = after or dt.datetime.now(dt.UTC) - dt.timedelta(hours=first_window_hours)
    prefix = capture_prefix(settings.artifact_root, endpoint)
    first = "" if after else f" (a first run: the last {first_window_hours:g} h at most)"
    logger.info("Reading capture of %r under %s since %s%s", endpoint, prefix, since.isoformat(), first)
    window = TrafficWindow.read(CaptureReader(storage, prefix, after, None if after else since))
    if window.skipped:
        logger.warning("%s: %d capture lines skipped: %s", endpoint, window.skipped, "; ".join(window.problems[:5]))
    baseline, trained_from = None, None
    if record.model_ref:
        version = get_model_registry(settings).resolve(parse_reference(record.model_ref))
        baseline = load_baseline(storage, version.spec.baseline_uri)
        trained_from = version.spec.recipe.get("location", {}).get("source_uri")
    labels_uri = labels_uri or trained_from or settings.source_uri
    ids = sorted({image_id for image_id, _ in window.identified})
    labels = ground_truth(storage_for(settings, source=True), labels_uri, ids, window.problems) if ids else None
    metrics = get_invocation_metrics(settings)
    invocations = None
    if metrics is not None and window.requests and window.end is not None:
        invocations = metrics.invocation_counts(endpoint, since, window.end)
        logger.info(
            "%s: %s counts %d invocations, %d model errors",
            endpoint,
            invocations.source,
            invocations.invocations,
            invocations.model_errors,
        )
    report = monitor_window(
        endpoint,
        window,
        baseline,
        thresholds,
        labels=labels,
        model_version=record.model_ref or record.version,
        invocations=invocations,
    )
    save_report(storage, settings.artifact_root, report)
    logger.info("%s: %s: %s", endpoint, report.verdict, report.message)
    return report


@task(name="publish-monitor-report", cache_policy=NO_CACHE)
def publish_monitor_task(settings: Settings, report: MonitorReport) -> None:
    """The report as a table artifact and a plot, the verdict on the endpoint's artifact, and its event."""
    rows = [
        {"figure": "verdict", "value": f"{report.verdict}: {report.message}"},
        {"figure": "model version", "value": report.model_version or "-"},
        {"figure": "window", "value": f"{report.window_start or '-'} .. {report.window_end or '-'}"},
        {"figure": "requests", "value": str(report.requests)},
        {
            "figure": "model errors (5xx)",
            "value": f"{report.errors} ({report.error_rate:.1%}"
            + (
                f" of {report.invocations} invocations, {report.error_source})"
                if report.invocations is not None
                else ")"
            ),
        },
        {"figure": "client errors (4xx, not the model's)", "value": str(report.client_errors)},
        {
            "figure": "latency p50 / p90 / p99 (ms)",
            "value": " / ".join(f"{v:.0f}" for v in report.latency_ms.values()) or "-",
        },
        {
            "figure": "count PSI / chi-square p",
            "value": f"{report.psi:.3f} / {report.chi2_p:.2g}" if report.psi is not None else "-",
        },
        {
            "figure": "live accuracy / RMSE (labelled)",
            "value": f"{report.accuracy:.3f} / {report.rmse:.3f} ({report.labelled})"
            if report.accuracy is not None
            else "no labelled requests",
        },
        *(
            {
                "figure": f"input {row['feature']}",
                "value": f"baseline {row['baseline mean']:.1f}, live {row['live mean']:.1f}, "
                f"KS {row['KS']:.2f} (p {row['p']:.1e}){' DRIFT' if row['drift'] else ''}",
            }
            for row in report.features
        ),
        {"figure": "skipped capture lines", "value": str(report.skipped)},
        *({"figure": "skipped", "value": problem} for problem in report.problems[:20]),
    ]
    create_table_artifact(
        key=monitor_artifact_key(report.endpoint),
        table=rows,
        description=f"Monitor {report.endpoint}: {report.verdict}",
    )
    if report.predicted_shares:
        title = f"{report.endpoint} ({report.model_version}): {report.verdict}"
        png = monitor_plot(report.predicted_shares, report.baseline_shares, report.features, title)
        publish_plot(f"{monitor_artifact_key(report.endpoint)}-plot", png, title, report.message)
    record = EndpointRecords(settings, storage_for(settings)).read(report.endpoint)
    if record is not None:
        publish_endpoint(record, monitor=f"{report.verdict} at {now_iso()}: {report.message}")
    group = report.endpoint
    related = []
    if report.model_version and ":" in report.model_version:
        related.append(
            {
                "prefect.resource.id": f"bincount.model-version.{group}.{report.model_version.split(':')[1]}",
                "prefect.resource.role": "model-version",
                "prefect.resource.name": report.model_version,
            }
        )
    resource = {"prefect.resource.id": f"bincount.endpoint.{report.endpoint}", "prefect.resource.name": report.endpoint}
    payload = {
        "verdict": report.verdict,
        "message": report.message,
        "model_version": report.model_version,
        "requests": report.requests,
        "error_rate": report.error_rate,
        "errors": report.errors,
        "client_errors": report.client_errors,
        "error_source": report.error_source,
        "psi": report.psi,
        "drifted": report.drifted,
        "accuracy": report.accuracy,
        "rmse": report.rmse,
    }
    if report.error_rate_high:  # first: the verdict's event comes after it, so its arrival means this one was sent
        emit_event(event="bincount.monitor.error-rate-high", resource=resource, related=related, payload=payload)
    emit_event(
        event=EVENTS.get(report.verdict, "bincount.monitor.inconclusive"),
        resource=resource,
        related=related,
        payload=payload,
    )
