"""`bincount demo --drift` end to end at tiny sizes, on a real Prefect server, a local endpoint and real boto3 calls:
darker photos drift, the chain harvests the labelled ones, the nightly retrains on them and decides by its paired
test, and live accuracy is measured after on the version that decision left serving.

At these sizes the paired test cannot tell (about 30 test images): whether live accuracy rises is not asserted
here (docs/FEEDBACK.md: the demonstration, measured)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bincount.config import Location, Settings
from bincount.demo_data import generate_demo_bucket
from bincount.endpoints import EndpointRecords
from bincount.storage import Storage
from flows.drift_demo import DriftDemoResult, drift_demo
from flows.endpoints import delete_endpoint
from flows.train import TrainOptions

ENDPOINT = "drift-demo"
SHIFTED, LABELLED_SHARE = 160, 0.75
TINY = TrainOptions(
    recipe="seeds",
    arch="resnet18",
    image_size=32,
    max_jobs=1,
    seed=0,
    debugger=False,
    profiler=False,
    hyperparameters={"optimizer": "adamw", "lr-scheduler": "cosine"},
    search_space=[
        {"type": "categorical", "name": "lr", "values": [0.005]},
        {"type": "categorical", "name": "batch-size", "values": [32]},
        {"type": "categorical", "name": "epochs", "values": [8]},
    ],
)


@pytest.fixture(scope="module")
def demo(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DriftDemoResult]:
    root: Path = tmp_path_factory.mktemp("drift-demo")
    settings = Settings.load(
        artifact_root=str(root / "artifacts"), source_uri=str(root / "bucket"), data_dir=str(root / "data")
    )
    generate_demo_bucket(Storage(), settings.source_uri, images=160, seed=0, size=48)
    try:
        yield drift_demo(
            settings,
            TINY,
            endpoint_name=ENDPOINT,
            shifted=SHIFTED,
            after=100,
            labelled_share=LABELLED_SHARE,
            size=48,
            optimize=False,
        )
    finally:
        if EndpointRecords(settings, Storage()).read(ENDPOINT) is not None:  # none where the pipeline failed
            delete_endpoint(ENDPOINT, location=Location.of(settings))


def test_the_chain_runs_from_drift_to_a_decision_and_after_is_measured_on_what_serves(demo: DriftDemoResult) -> None:
    labelled = round(SHIFTED * LABELLED_SHARE)
    assert demo.before.verdict == "drift", demo.before.message
    assert "brightness" in demo.before.message
    assert demo.before.labelled == labelled, "the truth arrived for the labelled share"
    assert demo.harvest is not None and demo.harvest.version == 1 and len(demo.harvest.added) == labelled
    assert demo.nightly is not None
    decision = demo.nightly.decision
    assert decision.challenger_version == 2, "the nightly retrained on the harvested photos and registered it"
    assert decision.outcome in ("promoted", "kept"), decision.reason
    serving = 2 if decision.outcome == "promoted" else 1
    assert demo.after.model_version == f"{ENDPOINT}:{serving}", "after: the version the decision left serving"
    assert demo.after.labelled == 100 and demo.before.accuracy is not None and demo.after.accuracy is not None


def test_the_report_prints_before_and_after_the_decision_and_the_run_links(demo: DriftDemoResult) -> None:
    report = demo.report()
    assert f"live accuracy before: {demo.before.accuracy:.3f}" in report
    assert f"live accuracy after: {demo.after.accuracy:.3f}" in report
    assert f"nightly: {demo.nightly.decision.outcome}: {demo.nightly.decision.reason}" in report
    for step in ("pipeline", "monitor (before)", "harvest-feedback", "nightly-retrain", "monitor (after)"):
        assert f"  {step}: " in report and str(demo.links[step]).split()[-1] in report, demo.links
