"""The optimized model: export + int8 + parity, the new archive, serving it, and every fallback to eager."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from bincount.config import Settings
from bincount.contracts.serving import EndpointRecord
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend, runtime_client
from bincount.models import fetch_model, pack_folder, read_from_archive, write_untrained_model_dir
from bincount.optimize import Optimization, check_parity, optimize_model, predictions
from bincount.storage import Storage
from sm_scripts import inference
from sm_scripts.data import load_channel
from sm_scripts.model_dir import INFO_FILE, load_network, read_model_info
from sm_scripts.optimized import MIN_RUNTIME_VERSION, OPTIMIZED_FILES, WEIGHTS_FILE, runtime_version
from tasks.optimize import OPTIMIZATION_KEY, optimize_and_publish

SM_SCRIPTS = Path(inference.__file__).resolve().parent
NAME = "optimized"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet-18 (32 px) packed as train.py's model.tar.gz."""
    root = tmp_path_factory.mktemp("trained")
    return pack_folder(write_untrained_model_dir(root / "model", "resnet18", 32, seed=4), root / "model.tar.gz")


@pytest.fixture(scope="module")
def optimized(
    trained: Path, demo_channels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Optimization, bytes]:
    """The optimize stage run once with a bar every model passes; returns its result and the trained archive's
    bytes before it ran."""
    before = trained.read_bytes()
    output = tmp_path_factory.mktemp("optimized") / "model.tar.gz"
    result = optimize_model(
        Storage(),
        trained.as_uri(),
        demo_channels["train"].as_uri(),
        demo_channels["valid"].as_uri(),
        demo_channels["test"].as_uri(),
        output.as_uri(),
        max_accuracy_drop=1.0,
    )
    return result, before


@pytest.fixture(scope="module")
def optimized_dir(optimized: tuple[Optimization, bytes], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir, _ = fetch_model(Storage(), optimized[0].model_uri, tmp_path_factory.mktemp("fetched"))
    return model_dir


def test_parity_check_passes_within_the_bar_and_fails_past_it() -> None:
    truth = np.array([0, 1, 2, 3, 4] * 40)  # 200 images: one image is 0.5 points
    eager = truth.copy()
    eager[:20] = (eager[:20] + 1) % 5  # eager: 90% accurate
    one_more_wrong = eager.copy()
    one_more_wrong[100] = (one_more_wrong[100] + 1) % 5
    passed, parity, reason = check_parity(truth, eager, one_more_wrong)
    assert passed and parity["eager_accuracy"] == 0.9 and parity["optimized_accuracy"] == 0.895, reason
    assert parity["top1_agreement"] == 0.995 and "agreement 0.9950" in reason

    two_more_wrong = one_more_wrong.copy()
    two_more_wrong[101] = (two_more_wrong[101] + 1) % 5
    passed, parity, reason = check_parity(truth, eager, two_more_wrong)
    assert not passed and parity["optimized_accuracy"] == 0.89
    assert reason.startswith("parity failed") and "1.00 points below eager (at most 0.50)" in reason


def test_a_model_that_passes_parity_gets_a_new_archive_and_the_trained_one_is_untouched(
    optimized: tuple[Optimization, bytes], trained: Path, optimized_dir: Path
) -> None:
    result, before = optimized
    assert result.optimized and result.model_uri != trained.as_uri() and result.reason.startswith("passed parity")
    assert trained.read_bytes() == before, "the trained archive (maybe registered already) is never rewritten"
    with tarfile.open(fileobj=io.BytesIO(Path(result.model_uri.removeprefix("file://")).read_bytes())) as archive:
        assert sorted(archive.getnames()) == sorted(["model.pt", INFO_FILE, *OPTIMIZED_FILES])
    entry = json.loads((optimized_dir / INFO_FILE).read_text())["optimized"]
    assert entry["runtime"] == "openvino" and entry["precision"] == "int8" and entry["files"] == list(OPTIMIZED_FILES)
    assert entry["parity"]["images"] == result.images == 40 and 0.0 <= entry["parity"]["top1_agreement"] <= 1.0
    assert entry["parity"]["calibration_images"] == result.calibration_images == 40
    assert entry["parity"]["validation_images"] == result.validation_images == 40
    assert entry["parity"]["int8_layers"] == result.int8_layers > 0 and entry["parity"]["fp32_layers"] == 0, (
        "within the bar on the valid side, accuracy control reverts nothing"
    )
    _, trained_version = fetch_model(Storage(), trained.as_uri(), optimized_dir.parent)
    assert optimized_dir.name != trained_version, "the optimized archive is its own version, fetched apart"


def test_a_model_that_fails_parity_keeps_the_eager_one_and_writes_nothing(
    trained: Path, demo_channels: dict[str, Path], tmp_path: Path
) -> None:
    output = tmp_path / "model.tar.gz"
    result = optimize_model(
        Storage(),
        trained.as_uri(),
        demo_channels["train"].as_uri(),
        demo_channels["valid"].as_uri(),
        demo_channels["test"].as_uri(),
        output.as_uri(),
        max_accuracy_drop=-1.0,  # the int8 model would have to beat eager by 100 points
    )
    assert not result.optimized and result.model_uri == trained.as_uri()
    assert result.reason.startswith("parity failed") and result.top1_agreement is not None
    assert not output.exists()


def test_accuracy_control_reverts_the_layers_int8_gets_wrong_on_valid_and_the_test_side_still_decides(
    optimized: tuple[Optimization, bytes], trained: Path, demo_channels: dict[str, Path], tmp_path: Path
) -> None:
    """A valid channel labelled with the fp32 network's own answers: fp32 scores 100% there and every
    answer int8 flips is a lost point, so accuracy control must revert layers to fp32; parity is then
    judged on the test side as ever."""
    model_dir, _ = fetch_model(Storage(), trained.as_uri(), tmp_path / "fetched")
    info = read_model_info(model_dir)
    valid = load_channel(demo_channels["valid"], [str(c) for c in info["classes"]], int(info["image_size"]), 1)
    with torch.inference_mode():
        network = load_network(model_dir, info)
        answers = predictions(lambda x: network(x).numpy(), valid, info)
    for file, answer in zip(valid.files, answers, strict=True):
        target = tmp_path / "valid" / str(info["classes"][answer]) / Path(file).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, target)
    output = tmp_path / "model.tar.gz"
    result = optimize_model(
        Storage(),
        trained.as_uri(),
        demo_channels["train"].as_uri(),
        (tmp_path / "valid").as_uri(),
        demo_channels["test"].as_uri(),
        output.as_uri(),
    )
    plain = optimized[0]  # the same network under a bar that reverts nothing
    assert plain.fp32_layers == 0 and result.fp32_layers > 0, "accuracy control reverted layers to fp32"
    assert result.int8_layers + result.fp32_layers == plain.int8_layers, "the same network's layers, counted"
    assert result.int8_layers > 0, "one flipped image in 40 is worth reverting a few layers, not all"
    assert result.reason.startswith("passed parity" if result.optimized else "parity failed"), result.reason
    assert output.exists() == result.optimized
    if result.optimized:
        entry = json.loads(read_from_archive(Storage(), output.as_uri(), INFO_FILE))["optimized"]
        assert entry["precision"] == "int8" and entry["parity"]["fp32_layers"] == result.fp32_layers


def test_the_optimized_form_serves_the_same_counts_as_eager_through_the_same_preprocessing(
    optimized_dir: Path, trained: Path, tmp_path: Path
) -> None:
    model = inference.model_fn(str(optimized_dir))
    assert model.serving["path"] == "openvino-int8" and model.optimized is not None
    eager_dir, _ = fetch_model(Storage(), trained.as_uri(), tmp_path)
    eager = inference.model_fn(str(eager_dir))
    assert eager.serving == {"path": "eager", "reason": "the model has no optimized form"}
    images = [jpeg_bytes(render_bin_image(count, np.random.default_rng(count), 64)) for count in (1, 3, 5)]
    body = json.dumps({"images": [base64.b64encode(image).decode() for image in images]})
    served = inference.predict_fn(inference.input_fn(body, "application/json"), model)
    reference = inference.predict_fn(inference.input_fn(body, "application/json"), eager)
    assert len(served) == 3 and all(sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-4) for p in served)
    for int8, fp32 in zip(served, reference, strict=True):
        assert max(abs(int8["probabilities"][k] - fp32["probabilities"][k]) for k in fp32["probabilities"]) < 0.1


def broken_copy(optimized_dir: Path, tmp_path: Path, info_change: dict | None = None) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(optimized_dir, folder)
    if info_change:
        info = json.loads((folder / INFO_FILE).read_text())
        info["optimized"].update(info_change)
        (folder / INFO_FILE).write_text(json.dumps(info))
    return folder


def assert_serves_eager_saying(model: inference.CountModel, says: str, caplog: pytest.LogCaptureFixture) -> None:
    """The model fell back to eager, its record and a warning say ``says``, and it still counts a photo."""
    assert model.serving["path"] == "eager" and model.optimized is None
    assert re.search(says, model.serving["reason"]), model.serving["reason"]
    assert any(r.levelname == "WARNING" and re.search(says, r.getMessage()) for r in caplog.records), caplog.text
    image = jpeg_bytes(render_bin_image(2, np.random.default_rng(0), 64))
    (prediction,) = inference.predict_fn(inference.input_fn(image, "image/jpeg"), model)
    assert prediction["predicted_count"] in (1, 2, 3, 4, 5), "eager serves"


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"runtime": "tensorrt"}, "names the runtime 'tensorrt'; this inference.py serves 'openvino' only"),
        ({"min_runtime_version": "9999.1"}, r"openvino \d+\.\d+ is older than the 9999.1 this model needs"),
        (None, "openvino cannot run optimized.xml"),  # a truncated optimized.bin
    ],
)
def test_an_optimized_form_that_cannot_serve_here_falls_back_to_eager_and_says_why(
    optimized_dir: Path, tmp_path: Path, change: dict | None, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = broken_copy(optimized_dir, tmp_path, change)
    if change is None:
        weights = folder / WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level("INFO", logger="sm_scripts.inference"):
        model = inference.model_fn(str(folder))
    assert_serves_eager_saying(model, says, caplog)


def test_an_openvino_that_is_installed_but_does_not_import_serves_eager_and_says_why(
    optimized_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its metadata is there (so the version check passes) but ``import openvino`` fails, as a broken
    install's does: the loader must not let the ImportError out of model_fn."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # Python's own import then raises ImportError
    with caplog.at_level("INFO", logger="sm_scripts.inference"):
        model = inference.model_fn(str(optimized_dir))
    says = r"openvino \d+\.\d+ is installed but does not import \(import of openvino halted.*\): reinstall it"
    assert_serves_eager_saying(model, says, caplog)


def test_the_container_requirements_list_the_runtime_at_the_version_the_loader_needs() -> None:
    lines = [line.strip() for line in (SM_SCRIPTS / "requirements.txt").read_text().splitlines()]
    (spec,) = [line for line in lines if re.match(r"openvino\b", line)]
    bound = re.fullmatch(r"openvino>=(\d+)\.(\d+)", spec)
    assert bound, f"{spec!r}: give openvino a lower bound"
    assert tuple(map(int, bound.groups())) >= MIN_RUNTIME_VERSION
    installed = runtime_version()
    assert installed is not None and installed >= MIN_RUNTIME_VERSION, "the project's own lock installs it too"


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> LocalServingBackend:
    settings = Settings.load(artifact_root=str(tmp_path_factory.mktemp("artifacts")))
    return LocalServingBackend(settings, host_options=HostOptions(max_batch_size=4, max_wait_ms=5, threads=1))


@pytest.fixture(scope="module")
def endpoint(optimized: tuple[Optimization, bytes], backend: LocalServingBackend) -> Iterator[EndpointRecord]:
    yield backend.deploy(NAME, optimized[0].model_uri)
    backend.delete(NAME)


def test_the_local_endpoint_serves_the_optimized_model_and_ping_says_so(endpoint: EndpointRecord) -> None:
    ping = httpx.get(f"{endpoint.url}/ping", timeout=10)
    assert ping.status_code == 200 and ping.json()["serving"] == "openvino-int8", ping.text
    assert endpoint.details["serving"]["path"] == "openvino-int8", "the record (and the endpoint artifact) says so"
    assert "passed parity" in endpoint.details["serving"]["reason"]
    client = runtime_client(endpoint.url, max_attempts=1)
    image = jpeg_bytes(render_bin_image(4, np.random.default_rng(1), 64))
    answer = client.invoke_endpoint(EndpointName=NAME, Body=image, ContentType="image/jpeg")
    (prediction,) = json.loads(answer["Body"].read())["predictions"]
    assert prediction["predicted_count"] in (1, 2, 3, 4, 5)


def test_an_endpoint_whose_optimized_form_does_not_load_serves_eager_and_its_record_says_why(
    optimized_dir: Path, backend: LocalServingBackend, tmp_path: Path
) -> None:
    folder = broken_copy(optimized_dir, tmp_path)
    weights = folder / WEIGHTS_FILE  # truncated: another version than the good one, which the module's endpoint serves
    weights.write_bytes(weights.read_bytes()[:1000])
    record = backend.deploy("optimized-fallback", pack_folder(folder, tmp_path / "model.tar.gz").as_uri())
    try:
        assert record.details["serving"] == {
            "path": "eager",
            "reason": "its optimized form did not load on the host: the host's log says why",
        }
        client = runtime_client(record.url, max_attempts=1)
        image = jpeg_bytes(render_bin_image(3, np.random.default_rng(2), 64))
        answer = client.invoke_endpoint(EndpointName=record.name, Body=image, ContentType="image/jpeg")
        assert json.loads(answer["Body"].read())["predictions"][0]["predicted_count"] in (1, 2, 3, 4, 5)
    finally:
        backend.delete(record.name)


@flow(name="optimize-stage")
def optimize_stage(artifact_root: str, model_uri: str, channels: dict[str, str]) -> str:
    """The optimize stage as the pipeline runs it: the cached task, then its artifact."""
    return optimize_and_publish(Settings.load(artifact_root=artifact_root), model_uri, channels, "export-fails")


def test_an_export_that_fails_keeps_the_eager_model_says_why_and_the_endpoint_serves_eager(
    prefect_server: None,
    trained: Path,
    demo_channels: dict[str, Path],
    backend: LocalServingBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The converter cannot be imported on the machine that runs the stage: the export raises a real
    ImportError, and the stage hands back the trained archive, untouched, with the reason."""
    import nncf  # noqa: F401  imported whole first: blocking openvino under it would leave a half-imported nncf

    before = trained.read_bytes()
    channels = {name: folder.as_uri() for name, folder in demo_channels.items()}
    with pytest.MonkeyPatch.context() as patch, caplog.at_level("INFO"):
        patch.setitem(sys.modules, "openvino", None)
        state = optimize_stage(str(tmp_path / "artifacts"), trained.as_uri(), channels, return_state=True)
    model_uri = state.result()
    assert model_uri == trained.as_uri() and trained.read_bytes() == before, "the trained archive, as it was"
    assert not (tmp_path / "artifacts" / "optimized-models").exists(), "nothing written"
    says = r"export failed: ModuleNotFoundError: import of openvino halted.*\. The eager model serves\. Install the"
    assert any(
        r.name == "prefect.task_runs" and r.levelname == "WARNING" and re.search(says, r.getMessage())
        for r in caplog.records
    ), caplog.text
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[OPTIMIZATION_KEY]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert re.match(f"eager: {says}", artifact.description or ""), artifact.description
    assert "| serves | eager (PyTorch) |" in str(artifact.data) and "export failed: ModuleNotFoundError" in str(
        artifact.data
    )

    record = backend.deploy("export-failed", model_uri)
    try:
        assert record.details["serving"] == {
            "path": "eager",
            "reason": "the model has no optimized form (the optimize stage's model-optimization artifact says why)",
        }
        assert httpx.get(f"{record.url}/ping", timeout=10).json()["serving"] == "eager"
    finally:
        backend.delete(record.name)

    # The converter is back: the next run tries the export again rather than serve the failure from cache.
    again = optimize_stage(str(tmp_path / "artifacts"), trained.as_uri(), channels, return_state=True).result()
    assert again == (tmp_path / "artifacts" / "optimized-models" / "export-fails" / "model.tar.gz").as_uri()
