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
from bincount.contracts.serving import EndpointRecord, ServingPath
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.local.host import HostOptions
from bincount.local.serving import LocalServingBackend, runtime_client
from bincount.models import fetch_model, pack_folder, read_from_archive, write_untrained_model_dir
from bincount.optimize import Optimization, ParityRule, check_parity, optimize_model, predictions
from bincount.storage import Storage
from sm_scripts import inference
from sm_scripts.data import load_channel
from sm_scripts.model_dir import INFO_FILE, load_network, read_model_info
from sm_scripts.optimized import MIN_RUNTIME_VERSION, OPTIMIZED_FILES, WEIGHTS_FILE, runtime_version
from tasks.optimize import OPTIMIZATION_KEY, optimize_and_publish

SM_SCRIPTS = Path(inference.__file__).resolve().parent
NAME = "optimized"
ANY_PARITY = ParityRule(alpha=0.0, max_drop=1.0, min_agreement=0.0)  # passes every int8: the stage's plumbing


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet-18 (32 px) packed as train.py's model.tar.gz."""
    root = tmp_path_factory.mktemp("trained")
    return pack_folder(write_untrained_model_dir(root / "model", "resnet18", 32, seed=4), root / "model.tar.gz")


@pytest.fixture(scope="module")
def optimized(
    trained: Path, demo_channels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Optimization, bytes]:
    """The optimize stage run once with bars every model passes (accuracy control and parity); returns its result
    and the trained archive's bytes before it ran."""
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
        parity=ANY_PARITY,
    )
    return result, before


@pytest.fixture(scope="module")
def optimized_dir(optimized: tuple[Optimization, bytes], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir, _ = fetch_model(Storage(), optimized[0].model_uri, tmp_path_factory.mktemp("fetched"))
    return model_dir


def parity_case(
    images: int, only_eager: int, only_int8: int, both_wrong_apart: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test-side counts (class indexes) for eager and int8 with this many images only eager gets right, only int8,
    and both get wrong with different answers; every other image both get right. Eager misses 10% besides."""
    truth = np.array([i % 5 for i in range(images)])
    eager, optimized = truth.copy(), truth.copy()
    wrong = (truth + 1) % 5
    cells = np.cumsum([only_eager, only_int8, both_wrong_apart, images // 10])
    optimized[: cells[0]] = wrong[: cells[0]]
    eager[cells[0] : cells[1]] = wrong[cells[0] : cells[1]]
    eager[cells[1] : cells[2]], optimized[cells[1] : cells[2]] = (
        wrong[cells[1] : cells[2]],
        (truth + 2)[cells[1] : cells[2]] % 5,
    )
    eager[cells[2] : cells[3]] = optimized[cells[2] : cells[3]] = wrong[cells[2] : cells[3]]
    return truth, eager, optimized


def test_int8_that_loses_four_images_in_460_passes_as_chance() -> None:
    """The default recipe's int8 once lost 4 of 460 test images (-0.87 points) and failed the old 0.5-point bar; 4
    against 0 discordant is a one-sided McNemar p of 1/16: not worse with confidence."""
    check = check_parity(*parity_case(460, only_eager=4, only_int8=0))
    assert check.passed and check.reason.startswith("passed parity: not worse than eager at alpha 0.05"), check.reason
    assert (check.only_eager_right, check.only_optimized_right, check.disagreements) == (4, 0, 4)
    assert check.p_value == 1 / 16 and check.top1_agreement == 1 - 4 / 460
    assert check.accuracy_change.estimate == pytest.approx(-4 / 460) and check.accuracy_change.high <= 0
    assert "4 images only eager gets right, 0 only int8" in check.reason and "(4 disagreements)" in check.reason


def test_int8_worse_than_eager_with_confidence_fails_below_the_ceiling() -> None:
    check = check_parity(*parity_case(1000, only_eager=8, only_int8=0))  # -0.8 points, p = 1/256
    assert check.eager_accuracy - check.optimized_accuracy == pytest.approx(0.008) and check.top1_agreement > 0.99
    assert not check.passed and check.p_value == 1 / 256
    assert check.reason.startswith("parity failed: worse than eager at alpha 0.05"), check.reason


def test_int8_whose_drop_passes_the_ceiling_fails_even_when_the_test_cannot_tell() -> None:
    check = check_parity(*parity_case(120, only_eager=9, only_int8=6))  # -2.5 points; 9 against 6 is chance
    assert check.p_value == pytest.approx(9949 / 2**15) and check.top1_agreement == 1 - 15 / 120 >= 0.85
    assert not check.passed
    assert check.reason.startswith("parity failed: 2.50 points below eager, past the ceiling of 2.00"), check.reason


@pytest.mark.parametrize(
    ("case", "moved"),
    [
        ({"only_eager": 0, "only_int8": 0, "both_wrong_apart": 20}, "no accuracy at all"),
        ({"only_eager": 0, "only_int8": 20, "both_wrong_apart": 0}, "20 points of accuracy up"),
    ],
)
def test_int8_that_changes_many_answers_either_way_fails_on_agreement(case: dict[str, int], moved: str) -> None:
    """Quantizing the same network moves few answers: 80% agreement means a broken export, whatever it did to
    accuracy."""
    check = check_parity(*parity_case(100, **case))
    assert check.top1_agreement == 0.8 and check.disagreements == 20
    assert not check.passed, moved
    assert check.reason.startswith("parity failed: agreement under the floor of 0.85: the export looks broken")


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
    assert entry["parity"]["passed"] and entry["parity"]["reason"] == result.reason
    assert entry["parity"]["p_value"] == result.p_value and entry["parity"]["disagreements"] == result.disagreements
    assert entry["parity"]["test"].startswith("exact McNemar, one-sided")
    assert (
        result.accuracy_change is not None and entry["parity"]["accuracy_change"]["low"] == result.accuracy_change.low
    )
    assert entry["parity"]["rule"] == {"alpha": 0.0, "max_drop": 1.0, "min_agreement": 0.0}
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
        max_accuracy_drop=1.0,
        parity=ParityRule(alpha=0.0, max_drop=-1.0, min_agreement=0.0),  # int8 would have to beat eager by 100 points
    )
    assert not result.optimized and result.model_uri == trained.as_uri()
    assert result.reason.startswith("parity failed") and "past the ceiling of -100.00" in result.reason, result.reason
    assert result.top1_agreement is not None and result.p_value is not None and result.accuracy_change is not None
    assert not output.exists()


def test_accuracy_control_reverts_the_layers_int8_gets_wrong_on_valid(
    optimized: tuple[Optimization, bytes], trained: Path, demo_channels: dict[str, Path], tmp_path: Path
) -> None:
    """A valid channel labelled with the fp32 network's own answers: fp32 scores 100% there and every
    answer int8 flips is a lost point, so accuracy control must revert layers to fp32. Parity on the test side
    (its rule is tested above on constructed answers) is set to pass, so the reverted model's archive is written."""
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
        parity=ANY_PARITY,
    )
    plain = optimized[0]  # the same network under a bar that reverts nothing
    assert plain.fp32_layers == 0 and result.fp32_layers > 0, "accuracy control reverted layers to fp32"
    assert result.int8_layers + result.fp32_layers == plain.int8_layers, "the same network's layers, counted"
    assert result.int8_layers > 0, "one flipped image in 40 is worth reverting a few layers, not all"
    assert result.optimized and result.reason.startswith("passed parity"), result.reason
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
    assert endpoint.serving and endpoint.serving.path == "openvino-int8", (
        "the record (and the endpoint artifact) says so"
    )
    assert "passed parity" in endpoint.serving.reason
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
        assert record.serving == ServingPath(
            path="eager",
            reason="its optimized form did not load on the host: the host's log says why",
        )
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
        assert record.serving == ServingPath(
            path="eager",
            reason="the model has no optimized form (the optimize stage's model-optimization artifact says why)",
        )
        assert httpx.get(f"{record.url}/ping", timeout=10).json()["serving"] == "eager"
    finally:
        backend.delete(record.name)

    # The converter is back: the next run tries the export again rather than serve the failure from cache.
    again = optimize_stage(str(tmp_path / "artifacts"), trained.as_uri(), channels, return_state=True).result()
    assert again == (tmp_path / "artifacts" / "optimized-models" / "export-fails" / "model.tar.gz").as_uri()
