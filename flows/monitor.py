"""Flow: watch live endpoints: their captured traffic against the baseline of the model they serve.

    per endpoint: stream capture since the cursor ─► counts, model errors, latency, input statistics ─► drift tests
                  (vs the version's training baseline) ─► live accuracy (ids with metadata) ─► report + event

Deployment ``monitor-endpoint/hourly``. One endpoint's failure (say, an unreadable record) is reported
after the others are done: it never hides their results; a capture line that cannot be read is skipped,
listed in the report and passed by the cursor. Drift and ok are events
(``bincount.monitor.drift-detected`` / ``bincount.monitor.ok``) that automations act on.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from bincount.config import Location, to_uri
from bincount.endpoints import EndpointRecords
from bincount.monitoring import DriftThresholds, MonitorReport
from bincount.storage import storage_for
from tasks.monitor import monitor_traffic_task, publish_monitor_task


class MonitorError(RuntimeError):
    """Some endpoints could not be monitored; the others' results are published."""


@flow(name="monitor-endpoint")
def monitor_endpoint(
    endpoint_names: list[str] | None = None,
    thresholds: DriftThresholds = DriftThresholds(),
    labels_uri: str | None = None,
    location: Location = Location(),
    first_window_hours: float = 24.0,
) -> list[MonitorReport]:
    """Compare each endpoint's traffic since the last run with its model's training baseline.

    Args:
        endpoint_names: the endpoints to watch (default: every recorded endpoint).
        thresholds: when drift is called.
        labels_uri: a bucket laid out like ABID whose ``metadata/<id>.json`` labels requests sent with
            ``InferenceId=<id>`` (default: the bucket the served version was trained from, else the data source).
        location: where the capture, registry and records live (default: the BINCOUNT_* variables).
        first_window_hours: an endpoint never monitored before has at most its last this many hours read.
    """
    logger = get_run_logger()
    settings = location.settings()
    names = endpoint_names or EndpointRecords(settings, storage_for(settings)).names()
    if not names:
        logger.warning("no endpoints are recorded under %s: nothing to monitor", settings.artifact_root)
        return []
    labels = to_uri(labels_uri) if labels_uri else None
    futures = {
        name: monitor_traffic_task.submit(settings, name, thresholds, labels, first_window_hours) for name in names
    }
    reports, failed = [], []
    for name, future in futures.items():
        state = future.wait() or future.state
        if state.is_completed():
            report = future.result()
            publish_monitor_task(settings, report)
            reports.append(report)
        else:
            failed.append(f"{name}: {state.message}")
    if failed:
        raise MonitorError(
            f"{len(failed)} of {len(names)} endpoints could not be monitored (the others were): " + "; ".join(failed)
        )
    return reports
