"""The feedback loop shown end to end: shifted traffic, drift found, the chain run, live accuracy before and after.

    pipeline (serving model, capture at 100%) ─► shifted traffic with InferenceIds, the truth for a share of it
    ─► monitor-endpoint (drift? live accuracy before) ─► harvest-feedback (labelled photos join the dataset, the
    rest queue) ─► nightly-retrain (latest manifest version; promote or keep by the paired test)
    ─► fresh shifted traffic ─► monitor-endpoint (live accuracy after)

The chain's steps are called here in the order its automations run them (``deployments/automations.py``
``feedback_chain_automations``: drift-detected starts the harvest, the harvest's event the nightly), in this
process, so the demonstration needs no worker; the automations themselves are tested in tests/test_feedback.py.
``bincount demo --drift`` runs it on the demo data; ``benchmarks/learning_curve.py`` uses the traffic helpers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from prefect.settings import get_current_settings

from bincount.config import Location, Settings
from bincount.contracts.serving import EndpointRecord
from bincount.demo_data import shifted_demo_photos
from bincount.endpoints import EndpointRecords
from bincount.feedback import FeedbackVersion
from bincount.local.serving import runtime_client
from bincount.manifest import metadata_uri
from bincount.monitoring import MonitorReport
from bincount.storage import Storage, storage_for
from flows.data import DataOptions
from flows.harvest import harvest_feedback
from flows.monitor import monitor_endpoint
from flows.nightly import NightlyResult, nightly_retrain
from flows.pipeline import PipelineResult, pipeline
from flows.train import TrainOptions


@dataclass(frozen=True)
class Request:
    """One photo sent to the endpoint: its InferenceId, and its count when the truth arrives for it."""

    inference_id: str
    photo: bytes
    count: int
    labelled: bool


def write_labels(storage: Storage, labels_uri: str, requests: Sequence[Request]) -> int:
    """The truth of the labelled requests, laid out like ABID (``metadata/<InferenceId>.json``); returns how many."""
    labelled = [r for r in requests if r.labelled]
    for request in labelled:
        document = {"EXPECTED_QUANTITY": request.count, "image_fname": f"{request.inference_id}.jpg"}
        storage.write_bytes(metadata_uri(labels_uri, request.inference_id), json.dumps(document).encode())
    return len(labelled)


def send_traffic(endpoint: EndpointRecord, requests: Sequence[Request]) -> None:
    """Ask the endpoint for a count of each photo through boto3's ``sagemaker-runtime`` client, with its InferenceId;
    returns once the endpoint's capture holds them all."""
    client = runtime_client(endpoint.url)
    before = captured(endpoint)
    for request in requests:
        client.invoke_endpoint(
            EndpointName=endpoint.name, Body=request.photo, ContentType="image/jpeg", InferenceId=request.inference_id
        )
    wait_for(lambda: captured(endpoint) >= before + len(requests), f"{len(requests)} requests to be captured")


def captured(endpoint: EndpointRecord) -> int:
    """Requests the local endpoint's capture writer has written (its router's ``/router/status``)."""
    status = httpx.get(f"{endpoint.url.rstrip('/')}/router/status", timeout=10).json()
    return int((status.get("capture") or {}).get("captured", 0))


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    """Poll ``condition`` (the capture writer is asynchronous: it writes after the answer)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}: is the endpoint capturing (100%)?")
        time.sleep(0.2)


def run_link(state: Any) -> str:
    """Where to see a flow run: its page in the Prefect UI, or its id where no UI address is configured."""
    run_id = state.state_details.flow_run_id
    base = get_current_settings().ui_url
    return f"{base.rstrip('/')}/runs/flow-run/{run_id}" if base else f"flow run {run_id}"


@dataclass(frozen=True)
class DriftDemoResult:
    """What the demonstration saw and did."""

    endpoint: str
    before: MonitorReport
    harvest: FeedbackVersion | None
    nightly: NightlyResult | None  # None: the monitor found no drift, so the chain did not run
    after: MonitorReport
    links: dict[str, str]

    def report(self) -> str:
        """What `bincount demo --drift` prints."""
        lines = [f"\nShifted traffic to {self.endpoint!r} (darker, recompressed photos):"]
        lines.append(f"  monitor: {self.before.verdict}: {self.before.message}")
        lines.append(f"  live accuracy before: {accuracy_words(self.before)}")
        if self.nightly is None:
            lines.append("  no drift found: the chain did not run")
        else:
            added = len(self.harvest.added) if self.harvest else 0
            lines.append(
                f"  harvest: {added} labelled photos joined the dataset"
                + (f" (manifest version {self.harvest.version}, {self.harvest.images} images)" if self.harvest else "")
            )
            decision = self.nightly.decision
            outcome = decision.outcome or ("promoted" if decision.promoted else "kept")
            lines.append(f"  nightly: {outcome}: {decision.reason}")
        lines.append(f"  live accuracy after: {accuracy_words(self.after)}")
        lines += ["Runs:"] + [f"  {step}: {link}" for step, link in self.links.items()]
        return "\n".join(lines)


def accuracy_words(report: MonitorReport) -> str:
    if report.accuracy is None:
        return f"none ({report.labelled} labelled requests)"
    return f"{report.accuracy:.3f} on {report.labelled} labelled requests to {report.model_version}"


def shifted_requests(images: int, seed: int, size: int, labelled_share: float, prefix: str) -> list[Request]:
    """``images`` new darker, recompressed demo photos; the first ``labelled_share`` of them get their truth."""
    photos = shifted_demo_photos(images, seed, size)
    cut = round(labelled_share * images)
    return [Request(f"{prefix}-{n:05d}", photo, count, n < cut) for n, (count, photo) in enumerate(photos)]


def drift_demo(
    settings: Settings,
    training: TrainOptions,
    endpoint_name: str = "bincount",
    shifted: int = 300,
    after: int = 150,
    labelled_share: float = 0.8,
    size: int = 224,
    optimize: bool = True,
    seed: int = 0,
) -> DriftDemoResult:
    """Run the pipeline on the demo bucket (``settings.source_uri``) with every request captured, send ``shifted``
    darker photos (the truth for ``labelled_share`` of them), run the chain, then send ``after`` fresh ones."""
    location = Location.of(settings)
    storage = storage_for(settings)
    labels_uri = settings.artifact_uri("demo-labels")
    links: dict[str, str] = {}

    state = pipeline(
        DataOptions(),
        training,
        endpoint_name=endpoint_name,
        location=location,
        data_capture_percentage=100,
        optimize=optimize,
        return_state=True,
    )
    served: PipelineResult = state.result()
    links["pipeline"] = run_link(state)
    if served.endpoint is None:
        raise RuntimeError(f"the pipeline deployed nothing ({served.deployment}): no endpoint to send traffic to")

    first = shifted_requests(shifted, seed, size, labelled_share, "shift")
    write_labels(storage, labels_uri, first)
    send_traffic(served.endpoint, first)
    state = monitor_endpoint([endpoint_name], labels_uri=labels_uri, location=location, return_state=True)
    (before,) = state.result()
    links["monitor (before)"] = run_link(state)

    version, nightly = None, None
    if before.verdict == "drift":
        state = harvest_feedback(endpoint_name, labels_uri=labels_uri, location=location, return_state=True)
        version = state.result()
        links["harvest-feedback"] = run_link(state)
        state = nightly_retrain(endpoint_name, location=location, optimize=optimize, return_state=True)
        nightly = state.result()
        links["nightly-retrain"] = run_link(state)

    second = shifted_requests(after, seed + 1, size, 1.0, "after")
    write_labels(storage, labels_uri, second)
    serving = EndpointRecords(settings, storage).read(endpoint_name)  # a promotion may have moved it
    send_traffic(serving or served.endpoint, second)
    state = monitor_endpoint([endpoint_name], labels_uri=labels_uri, location=location, return_state=True)
    (after_report,) = state.result()
    links["monitor (after)"] = run_link(state)
    return DriftDemoResult(endpoint_name, before, version, nightly, after_report, links)
