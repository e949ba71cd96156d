"""The whole pipeline and the nightly retrain on demo data, on a real Prefect server, on the CPU."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import UUID

import boto3
import httpx
import numpy as np
import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentTaskRunId,
)
from prefect.client.schemas.objects import Artifact
from prefect.events import Event
from prefect.events.filters import EventFilter, EventNameFilter
from waiting import wait_until

from bincount.code import code_hash
from bincount.config import Location, Settings
from bincount.contracts.serving import EndpointNotFoundError
from bincount.demo_data import generate_demo_bucket, jpeg_bytes, render_bin_image
from bincount.factory import get_model_registry, get_serving_backend
from bincount.models import read_from_archive
from bincount.monitoring import MonitorReport, save_report
from bincount.split import read_split
from bincount.storage import Storage, local_path
from flows.cli import main as cli
from flows.data import DataOptions
from flows.nightly import NoProductionModelError, nightly_retrain
from flows.pipeline import PipelineResult, pipeline
from flows.train import TrainOptions
from tasks.summary import summary_key

ENDPOINT = "pipeline-test"
TINY = TrainOptions(
    recipe="seeds",
    arch="resnet18",
    image_size=32,
    max_jobs=2,
    seed=0,
    hyperparameters={"debugger-save-interval": 50, "profile-steps": 2},
    search_space=[
        {"type": "continuous", "name": "lr", "low": 0.01, "high": 0.05, "scaling": "Logarithmic"},
        {"type": "categorical", "name": "batch-size", "values": [32]},
        {"type": "integer", "name": "epochs", "low": 2, "high": 3},
    ],
)


def all_task_states(flow_run_id: UUID) -> dict[str, set[str]]:
    """Task name -> the states of its runs, in this flow run and every subflow under it."""
    states: dict[str, set[str]] = {}
    with get_client(sync_client=True) as client:
        pending = [flow_run_id]
        while pending:
            run_id = pending.pop()
            for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))):
                states.setdefault(task_run.name.rsplit("-", 1)[0], set()).add(task_run.state.name)
                children = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[task_run.id]))
                )
                pending += [child.id for child in children]
    return states


def artifacts_keyed(key: str) -> list[Artifact]:
    """Every version of the artifact ``key``, newest first."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda artifact: artifact.created, reverse=True)


def events_named(
    name: str, related_to: str | None = None, wait_s: float = 30.0, where: Callable[[Event], bool] | None = None
) -> list[Event]:
    """Events ``name`` (related to ``related_to``, and for which ``where`` holds) on the server; they are
    written asynchronously: wait for one to arrive (an earlier event of the same name does not end the wait)."""

    def matching() -> list[Event]:
        with get_client(sync_client=True) as client:
            found = client.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=50).events
        if related_to is not None:
            found = [e for e in found if any(r.id == related_to for r in e.related)]
        return [e for e in found if where is None or where(e)]

    return wait_until(matching, timeout_s=wait_s, interval_s=0.5, what=f"an event {name}")


@pytest.fixture(scope="module")
def deployed(
    prefect_server: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, str], PipelineResult]]:
    """The pipeline run once on a demo bucket: its endpoint serves the first registered version."""
    root = tmp_path_factory.mktemp("pipeline")
    bucket = (root / "bucket").as_uri()
    generate_demo_bucket(Storage(), bucket, images=150, seed=1, size=64)
    where = {"source_uri": bucket, "artifact_root": str(root / "artifacts")}
    environment = pytest.MonkeyPatch()
    environment.setenv("BINCOUNT_DATA_DIR", str(root / "raw"))
    try:
        yield where, pipeline(DataOptions(), TINY, endpoint_name=ENDPOINT, location=Location(**where))
    finally:
        with contextlib.suppress(EndpointNotFoundError):  # stop the endpoint's processes
            get_serving_backend(Settings.load(artifact_root=where["artifact_root"])).delete(ENDPOINT)
        environment.undo()


def test_pipeline_end_to_end_registers_deploys_then_is_served_from_cache(
    deployed: tuple[dict[str, str], PipelineResult],
) -> None:
    where, result = deployed
    settings = Settings.load(artifact_root=where["artifact_root"])
    endpoint = get_serving_backend(settings).describe(ENDPOINT)
    assert endpoint.model_uri == result.model_uri and endpoint.model_ref == result.model_version == f"{ENDPOINT}:1"
    runtime = boto3.client("sagemaker-runtime", endpoint_url=endpoint.url, region_name="us-east-1")
    photo = jpeg_bytes(render_bin_image(3, np.random.default_rng(0), 64))
    answer = json.loads(
        runtime.invoke_endpoint(EndpointName=ENDPOINT, Body=photo, ContentType="image/jpeg")["Body"].read()
    )
    assert answer["predictions"][0]["predicted_count"] in (1, 2, 3, 4, 5)
    optimization = artifacts_keyed("model-optimization")[0]  # the optimize stage says which model it kept, and why
    optimized = optimization.description.startswith("optimized: passed parity")
    assert optimized or optimization.description.startswith("eager: parity failed"), optimization.description
    assert ("/optimized-models/" in result.model_uri) == optimized, (result.model_uri, optimization.description)
    serving = httpx.get(f"{endpoint.url}/ping", timeout=10).json()["serving"]
    assert serving == ("openvino-int8" if optimized else "eager"), (serving, optimization.description)

    scored = result.batch_transform
    assert scored is not None
    outputs = sorted(local_path(scored.output_uri).rglob("*.out"))
    assert len(outputs) == scored.scored > 0

    registry = get_model_registry(settings)
    version = registry.production(ENDPOINT)
    assert version is not None and (version.version, version.approval) == (1, "Approved")
    lineage = version.spec
    assert lineage.model_uri == result.model_uri and lineage.dataset.split_uri == result.dataset_split_uri
    assert lineage.dataset.counts == read_split(Storage(), result.dataset_split_uri)["split"].value_counts().to_dict()
    assert lineage.code_hash == code_hash() and lineage.metrics.accuracy == pytest.approx(result.evaluation.accuracy)
    assert lineage.hyperparameters["arch"] == "resnet18" and lineage.hyperparameters["train-channels"] == "train,valid"
    assert (
        lineage.recipe["location"]["source_uri"] == where["source_uri"]
        and lineage.recipe["training"]["image_size"] == 32
    )
    assert lineage.flow_run_id and lineage.flow_run_url
    best = registry.best_hyperparameters(ENDPOINT)
    assert best is not None and best.version == 1
    related = f"bincount.model-version.{ENDPOINT}.1"
    assert events_named("bincount.model.registered", related) and events_named("bincount.model.promoted", related)

    (summary,) = [
        a for a in artifacts_keyed(summary_key("bincount-pipeline")) if str(a.flow_run_id) == lineage.flow_run_id
    ]
    for figure in (
        f"| model version | {ENDPOINT}:1 |",
        f"| test accuracy | {result.evaluation.accuracy:.3g} |",
        endpoint.url,
        "| test RMSE |",
        "| training cost | ",
        "CPU minutes (local)",
        f"| deployment | {ENDPOINT}:1 on a new endpoint |",
        "| approval | Approved by bincount: test accuracy ",  # the gate approved it: no person was asked
        "prepare-data (",
        "train-model (",
        "batch-transform (",
        "| register-model | Completed |",
    ):
        assert figure in summary.data, (figure, summary.data)
    for key in ("data-report", "training-curves", "debugger-rules", "tuning-leaderboard", "confusion-matrix-plot"):
        assert f"[{key}](" in summary.data, f"the summary links {key}"
    rules = artifacts_keyed("debugger-rules")[0]
    fired = int(rules.description.rsplit(": ", 1)[1].split()[0])
    assert "| overfit |" in rules.data and rules.data.count("**FIRED**") == fired, (rules.description, rules.data)

    if optimized:  # item 11: the version's scores are those of the int8 form it serves, on the same test images
        parity = json.loads(read_from_archive(Storage(), result.model_uri, "model_info.json"))["optimized"]["parity"]
        assert (lineage.metrics.accuracy, lineage.metrics.images) == (
            pytest.approx(parity["optimized_accuracy"]),
            parity["images"],
        )

    rerun = pipeline(DataOptions(), TINY, endpoint_name=ENDPOINT, location=Location(**where), return_state=True)
    states = all_task_states(rerun.state_details.flow_run_id)
    for expensive in (
        "download-images",
        "report-data",
        "train-trial",
        "run-training-job",
        "optimize-model",
    ):
        assert states[expensive] == {"Cached"}, (expensive, states[expensive])
    assert rerun.result().model_version == result.model_version, "the same model is the same version"
    assert len(registry.list(ENDPOINT)) == 1
    again = get_serving_backend(settings).describe(ENDPOINT)
    assert (again.deployed_at, again.previous_model_ref) == (endpoint.deployed_at, None), "(f): nothing redeployed"
    summaries = [
        a for a in artifacts_keyed(summary_key("bincount-pipeline")) if f"| model version | {ENDPOINT}:1 |" in a.data
    ]
    assert len(summaries) == 2, "one summary per run under one key"
    (cached,) = [a for a in summaries if str(a.flow_run_id) == str(rerun.state_details.flow_run_id)]
    assert f"| deployment | {ENDPOINT}:1 already serves '{ENDPOINT}': nothing redeployed |" in cached.data, cached.data
    assert "replaced" not in cached.data, "a cached run replaces nothing"


def test_a_retune_nightly_on_unchanged_data_trains_afresh_and_leaves_production_serving(
    deployed: tuple[dict[str, str], PipelineResult],
) -> None:
    """Item 1: with retune=True on unchanged data and code, cached trials and a cached retrain would give the
    champion's own model, which the nightly then archived: production must stay, and serve."""
    where, _ = deployed
    location = Location(artifact_root=where["artifact_root"])
    settings = location.settings()
    registry = get_model_registry(settings)
    champion = registry.production(ENDPOINT)
    assert champion is not None and champion.spec.code_hash == code_hash()

    state = nightly_retrain(endpoint_name=ENDPOINT, location=location, retune=True, return_state=True)
    decision = state.result().decision
    states = all_task_states(state.state_details.flow_run_id)
    for trained in ("train-trial", "run-training-job"):
        assert "Cached" not in states[trained], (trained, states[trained])
    assert decision.challenger_version not in (None, champion.version), decision
    assert decision.outcome in ("promoted", "kept") and decision.serving_version == champion.version
    production = registry.production(ENDPOINT)
    assert production is not None, "a production version is left"
    serving = get_serving_backend(settings).describe(ENDPOINT)
    assert serving.model_ref == str(production.ref), "(a): what serves is the production version"
    if decision.promoted:
        assert production.version == decision.challenger_version
    else:
        assert production.version == champion.version
        assert registry.get(ENDPOINT, decision.challenger_version).stage == "archived"
    assert registry.decisions(ENDPOINT)[-1].outcome == decision.outcome, "(d): kept with its outcome"


def test_nightly_with_no_parameters_retrains_production_on_leak_free_data(
    deployed: tuple[dict[str, str], PipelineResult],
) -> None:
    where, first = deployed
    location = Location(artifact_root=where["artifact_root"])  # what a scheduled run has: BINCOUNT_* only
    settings, storage = location.settings(), Storage()
    registry = get_model_registry(settings)
    champion, registered, decided = (
        registry.production(ENDPOINT),
        len(registry.list(ENDPOINT)),
        len(registry.decisions(ENDPOINT)),
    )

    state = nightly_retrain(endpoint_name=ENDPOINT, location=location, return_state=True)
    unchanged = state.result().decision
    assert not unchanged.promoted and "nothing retrained" in unchanged.reason and unchanged.outcome == "unchanged"
    assert len(registry.list(ENDPOINT)) == registered, "no model is compared with itself"
    (summary,) = [
        a for a in artifacts_keyed(summary_key("nightly-retrain")) if a.flow_run_id == state.state_details.flow_run_id
    ]
    assert "| challenger | nothing retrained |" in summary.data and "(none)" not in summary.data, summary.data

    before = read_split(storage, first.dataset_split_uri).set_index("id")["split"]
    generate_demo_bucket(storage, where["source_uri"], images=220, seed=1, size=64)  # the manifest grows
    result = nightly_retrain(endpoint_name=ENDPOINT, location=location)
    decision = result.decision
    assert result.training_cost is not None and result.training_cost.unit == "cpu-seconds"
    assert decision.comparison is not None, "compared with the champion by the paired test"
    assert "exact McNemar p=" in decision.reason and decision.promoted == (decision.comparison.verdict == "better")

    after = read_split(storage, first.dataset_split_uri).set_index("id")["split"]
    assert len(after) > len(before) and (after[before.index] == before).all(), "no image changed sides"
    champion_trained_on = set(before[before != "test"].index)
    challenger = registry.get(ENDPOINT, registered + 1)
    test_side = set(after[after == "test"].index)
    assert test_side and not test_side & champion_trained_on and not test_side & set(after[after != "test"].index)
    assert challenger.spec.metrics.images == len(test_side) == challenger.spec.dataset.counts["test"]
    assert decision.comparison.images == len(test_side), "both scored on the same test images"
    assert challenger.spec.hyperparameters == champion.spec.hyperparameters, "the production recipe"
    assert (decision.challenger_version, decision.serving_version) == (challenger.version, champion.version)
    serving = get_serving_backend(settings).describe(ENDPOINT)
    if decision.promoted:
        assert registry.production(ENDPOINT).version == challenger.version
        assert serving.model_ref == str(challenger.ref)
    else:
        assert registry.get(ENDPOINT, challenger.version).stage == "archived"
        assert serving.model_ref == str(champion.ref)
    kind = "promoted" if decision.promoted else "kept"
    assert events_named(f"bincount.model.{kind}", where=lambda e: e.payload["challenger_version"] == challenger.version)
    assert [d.challenger_version for d in registry.decisions(ENDPOINT)[decided:]] == [None, challenger.version]
    # the reviewer's evidence: the challenger's model card, beside the version and as an artifact
    card = Storage().read_bytes(f"{registry.card_folder(ENDPOINT, challenger.version)}/card.md").decode()
    assert f"{challenger.ref}" in card and "## Where they disagree" in card and str(champion.ref) in card
    assert any(a.data == card for a in artifacts_keyed(f"model-card-{ENDPOINT}"))
    decision_artifact = artifacts_keyed(f"nightly-decision-{ENDPOINT}")[0]  # the newest
    assert f"Paired test ({decision.comparison.test}) on {len(test_side)} test images" in decision_artifact.data


def test_a_second_pipeline_run_decides_by_the_paired_test_against_what_serves(
    deployed: tuple[dict[str, str], PipelineResult],
) -> None:
    """Issue 25: with a version serving, the pipeline's new model replaces it only when a paired test on the same
    test images finds it better; the decision is kept with its statistics and shown beside live accuracy."""
    where, _ = deployed
    settings = Settings.load(artifact_root=where["artifact_root"])
    registry = get_model_registry(settings)
    serving = registry.production(ENDPOINT)
    assert serving is not None
    save_report(  # the monitor's last report: the serving model's accuracy on labelled traffic
        Storage(),
        settings.artifact_root,
        MonitorReport(ENDPOINT, str(serving.ref), "ok", "a test", labelled=40, accuracy=0.55, window_end="2026-12-07"),
    )
    another = TINY.model_copy(update={"seed": 1, "max_jobs": 1, "debugger": False, "profiler": False})
    state = pipeline(
        DataOptions(), another, endpoint_name=ENDPOINT, location=Location(**where), optimize=False, return_state=True
    )
    result = state.result()
    decision, comparison = result.decision, result.decision.comparison if result.decision else None
    assert decision is not None and comparison is not None, "compared with what serves by the paired test"
    challenger = registry.resolve(result.model_version)
    assert (decision.challenger_version, decision.serving_version) == (challenger.version, serving.version)
    assert "exact McNemar p=" in decision.reason and decision.promoted == (comparison.verdict == "better")
    assert comparison.images == challenger.spec.metrics.images, "both scored on the same test images"
    assert registry.decisions(ENDPOINT)[-1] == decision, "kept in the registry with its statistics"
    production = registry.production(ENDPOINT)
    assert production is not None and production.version == (
        challenger.version if decision.promoted else serving.version
    )
    assert get_serving_backend(settings).describe(ENDPOINT).model_ref == str(production.ref)

    artifact = artifacts_keyed(f"pipeline-decision-{ENDPOINT}")[0]
    assert f"Paired test ({comparison.test}) on {comparison.images} test images" in artifact.data, artifact.data
    assert f"0.55 on 40 labelled requests to {serving.ref} up to 2026-12-07" in artifact.data, artifact.data
    (summary,) = [
        a for a in artifacts_keyed(summary_key("bincount-pipeline")) if a.flow_run_id == state.state_details.flow_run_id
    ]
    deployment = f"replaced {serving.ref}" if decision.promoted else f"not deployed ({decision.outcome})"
    for figure in (
        f"| paired test | {comparison.verdict}: exact McNemar p=",
        "| serving live accuracy | 0.55 on 40",
        deployment,
    ):
        assert figure in summary.data, (figure, summary.data)


def test_endpoints_are_described_pinged_and_stopped_with_a_stopped_artifact(
    deployed: tuple[dict[str, str], PipelineResult], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    where, _ = deployed
    monkeypatch.setenv("BINCOUNT_ARTIFACT_ROOT", where["artifact_root"])
    serving = get_serving_backend(Settings.load()).describe(ENDPOINT)
    ping = httpx.get(f"{serving.url}/ping", timeout=10)
    assert ping.status_code == 200 and ping.json()["model_version"] == serving.model_ref, ping.text
    assert ping.json()["status"] == "Healthy" and len(ping.content) < 300, "SageMaker's contract: 200, a small body"

    cli(["endpoints", "list"])
    listed = capsys.readouterr().out
    assert ENDPOINT in listed and f"Healthy, serving {serving.model_ref}" in listed and serving.url in listed, listed
    cli(["endpoints", "describe", ENDPOINT])
    described = capsys.readouterr().out
    for line in (
        f"model version    {serving.model_ref} (resnet18, 32 px",
        f"model URI        {serving.model_uri}",
        f"URL              {serving.url}",
        f"deployed         {serving.deployed_at}",
        "router port",
    ):
        assert line in described, (line, described)

    cli(["delete-endpoint", ENDPOINT])
    assert f"Endpoint {ENDPOINT!r} stopped (it served {serving.model_ref})" in capsys.readouterr().out
    latest = artifacts_keyed(f"endpoint-{ENDPOINT}")[0]
    assert f"Endpoint `{ENDPOINT}`: stopped" in latest.data and serving.url in latest.data, latest.data
    with pytest.raises(SystemExit):
        cli(["endpoints", "describe", ENDPOINT])
    assert "no endpoint named" in capsys.readouterr().err


def test_nightly_without_a_production_model_fails_at_once(prefect_server: None, tmp_path: Path) -> None:
    with pytest.raises(NoProductionModelError, match="run the pipeline first"):
        nightly_retrain(endpoint_name="nothing-deployed", location=Location(artifact_root=str(tmp_path)))
    assert not (tmp_path / "datasets").exists()


def test_an_invalid_endpoint_name_fails_before_any_training(prefect_server: None, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="endpoint name 'not_valid!'"):
        pipeline(DataOptions(), TINY, endpoint_name="not_valid!", location=Location(artifact_root=str(tmp_path)))
    assert not (tmp_path / "datasets").exists()
