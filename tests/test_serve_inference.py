"""The serving handlers (sm_scripts/inference.py) in-process: formats, answers, refusals."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from bincount.local.batcher import MicroBatcher
from sm_scripts import inference
from sm_scripts.model_dir import model_info, write_model_dir
from sm_scripts.networks import build_model
from sm_scripts.preprocessing import MAX_IMAGE_PIXELS

SM_SCRIPTS = Path(inference.__file__).resolve().parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ResNet-18 at 32 px, written as train.py writes its models."""
    torch.manual_seed(0)
    state = build_model("resnet18", 5).state_dict()
    return write_model_dir(tmp_path_factory.mktemp("model"), state, model_info("resnet18", [1, 2, 3, 4, 5], 32))


@pytest.fixture(scope="module")
def model(model_dir: Path) -> inference.CountModel:
    return inference.model_fn(str(model_dir))


def image_bytes(fmt: str, size: tuple[int, int] = (60, 40), colour: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def predict(body: bytes, content_type: str, model: inference.CountModel, accept: str | None = None) -> tuple[str, str]:
    return inference.output_fn(inference.predict_fn(inference.input_fn(body, content_type), model), accept)


def test_jpeg_png_and_x_image_answer_a_count_with_probabilities(model: inference.CountModel) -> None:
    for body, content_type in [
        (image_bytes("JPEG"), "image/jpeg"),
        (image_bytes("PNG"), "image/png"),
        (image_bytes("JPEG"), "application/x-image"),
    ]:
        answer, answer_type = predict(body, content_type, model)
        assert answer_type == "application/json"
        (prediction,) = json.loads(answer)["predictions"]
        assert prediction["predicted_count"] in (1, 2, 3, 4, 5)
        assert list(prediction["probabilities"]) == ["1", "2", "3", "4", "5"]
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        best = max(prediction["probabilities"], key=prediction["probabilities"].get)
        assert int(best) == prediction["predicted_count"]


def test_json_with_several_base64_images_answers_each_in_order(model: inference.CountModel) -> None:
    images = [image_bytes("JPEG", colour=(10 * i, 200 - 20 * i, 90)) for i in range(3)]
    singles = [json.loads(predict(data, "image/jpeg", model)[0])["predictions"][0] for data in images]
    encoded = [base64.b64encode(data).decode() for data in images]
    encoded[1] = "data:image/jpeg;base64," + encoded[1]
    for body in (json.dumps({"images": encoded}), json.dumps(encoded)):
        answer = json.loads(predict(body.encode(), "application/json; charset=utf-8", model)[0])["predictions"]
        assert [a["predicted_count"] for a in answer] == [s["predicted_count"] for s in singles]
        for got, alone in zip(answer, singles, strict=True):
            for count in alone["probabilities"]:
                assert got["probabilities"][count] == pytest.approx(alone["probabilities"][count], abs=1e-4)
    single = json.loads(predict(json.dumps({"image": encoded[0]}).encode(), "application/json", model)[0])
    assert len(single["predictions"]) == 1


def test_csv_answer_has_one_line_per_image(model: inference.CountModel) -> None:
    body = json.dumps({"images": [base64.b64encode(image_bytes("PNG")).decode()] * 2}).encode()
    answer, answer_type = predict(body, "application/json", model, accept="text/csv")
    assert answer_type == "text/csv"
    lines = answer.strip().splitlines()
    assert len(lines) == 2
    fields = lines[0].split(",")
    assert int(fields[0]) in (1, 2, 3, 4, 5) and len(fields) == 6
    assert sum(float(p) for p in fields[1:]) == pytest.approx(1.0, abs=1e-4)
    assert inference.choose_accept("text/html, application/json;q=0.9") == "application/json"
    assert inference.choose_accept("*/*") == "application/json"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "says"),
    [
        (b"\x00\x01garbage" * 50, "image/jpeg", 400, "not a JPEG or PNG"),
        (image_bytes("JPEG", (300, 300))[:400], "image/jpeg", 400, "not a readable JPEG or PNG"),
        (b"", "image/png", 400, "empty"),
        (image_bytes("GIF"), "image/jpeg", 400, "not a JPEG or PNG"),
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b'{"images": ["@@@"]}', "application/json", 400, "not valid base64"),
        (b'{"images": []}', "application/json", 400, "names no images"),
        (b'{"pictures": []}', "application/json", 400, '{"image"'),
        (b'{"images": [12]}', "application/json", 400, "not a base64 string"),
        (image_bytes("JPEG"), "text/plain", 415, "not supported"),
        (image_bytes("JPEG"), "", 415, "not supported"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(
    model: inference.CountModel, body: bytes, content_type: str, status: int, says: str
) -> None:
    with pytest.raises(inference.InputError, match=says) as caught:
        inference.predict_fn(inference.input_fn(body, content_type), model)
    assert caught.value.status_code == status


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG whose header (with a valid checksum) claims ``width`` x ``height`` pixels."""
    data = bytearray(image_bytes("PNG", (4, 4)))
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC over its type and data
    return bytes(data)


def test_oversized_image_is_refused_before_decoding(model: inference.CountModel) -> None:
    says = f"the image is 5000x4000: at most {MAX_IMAGE_PIXELS} pixels"
    with pytest.raises(inference.InputError, match=says) as caught:
        inference.input_fn(png_claiming_size(5000, 4000), "image/png")
    assert caught.value.status_code == 400


def test_grey_palette_and_alpha_pngs_are_served_as_rgb(model: inference.CountModel) -> None:
    for mode in ("L", "P", "RGBA", "LA"):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 120, 40)).convert(mode).save(buffer, format="PNG")
        (image,) = inference.input_fn(buffer.getvalue(), "image/png")
        assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
        assert len(inference.predict_fn([image], model)) == 1


def test_unsupported_accept_is_406() -> None:
    with pytest.raises(inference.UnsupportedAcceptError) as caught:
        inference.output_fn([], "application/xml")
    assert caught.value.status_code == 406


def test_non_finite_scores_are_refused_as_the_models_fault(tmp_path: Path, model_dir: Path) -> None:
    """A head whose logits overflow (a huge finite weight) gives NaN probabilities: refused, never answered."""
    state = torch.load(model_dir / "model.pt", weights_only=True)
    state["fc.weight"][0] = torch.finfo(torch.float32).max  # finite, but any positive activations overflow
    info = json.loads((model_dir / "model_info.json").read_text())
    overflowing = inference.model_fn(str(write_model_dir(tmp_path, state, info)))
    good = inference.model_fn(str(model_dir))
    images = inference.input_fn(image_bytes("JPEG"), "image/jpeg")
    says = r"non-finite scores \(NaN or infinity\) for {}: the model is at fault, not the request"
    for accept in ("application/json", "text/csv"):
        with pytest.raises(inference.NonFiniteScoresError, match=says.format("this image")):
            inference.output_fn(inference.predict_fn(images, overflowing), accept)
    with pytest.raises(inference.NonFiniteScoresError, match=says.format(r"image\(s\) \[1\] of this request")):
        inference.output_fn(inference.predict_fn(images, good) + inference.predict_fn(images, overflowing), None)
    assert not isinstance(inference.NonFiniteScoresError(), inference.InputError)  # a 500, not a 4xx
    json.loads(inference.output_fn(inference.predict_fn(images, good), None)[0])  # the good model still answers


def test_model_pt_is_loaded_without_unpickling_code(tmp_path: Path, model_dir: Path) -> None:
    """A model.pt holding an arbitrary object (code on load) is refused by weights_only loading."""
    (tmp_path / "model_info.json").write_text((model_dir / "model_info.json").read_text())
    torch.save({"payload": Path("/etc/passwd")}, tmp_path / "model.pt")  # a pickled non-tensor object
    with pytest.raises(Exception, match=r"[Ww]eights only load failed|Unsupported global"):
        inference.model_fn(str(tmp_path))


def test_model_info_errors_name_the_problem(tmp_path: Path, model_dir: Path) -> None:
    info = json.loads((model_dir / "model_info.json").read_text())
    (tmp_path / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    (tmp_path / "model_info.json").write_text(json.dumps({**info, "arch": "vgg16"}))
    with pytest.raises(ValueError, match="not one of"):
        inference.model_fn(str(tmp_path))
    del info["image_size"]
    (tmp_path / "model_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="image_size"):
        inference.model_fn(str(tmp_path))


@pytest.fixture(scope="module")
def efficientnet_dir(tmp_path_factory: pytest.TempPathFactory, demo_channels: dict[str, Path]) -> Path:
    """A tiny EfficientNet-Lite0 (train.py's own class, not torchvision's) trained one epoch by train.py."""
    tmp = tmp_path_factory.mktemp("efficientnet")
    env = {
        **os.environ,
        "SM_MODEL_DIR": str(tmp / "model"),
        "SM_OUTPUT_DIR": str(tmp / "output"),
        "SM_OUTPUT_DATA_DIR": str(tmp / "output" / "data"),
        "SM_CHANNEL_TRAIN": str(demo_channels["train"]),
        "SM_CHANNEL_VALID": str(demo_channels["valid"]),
        "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": "1",
    }
    flags = ["--arch", "efficientnet_lite0", "--weights", "none", "--image-size", "16", "--batch-size", "8"]
    flags += ["--epochs", "1"]
    result = subprocess.run(
        [sys.executable, "train.py", *flags], cwd=SM_SCRIPTS, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "model"


def test_every_arch_train_py_trains_is_served(efficientnet_dir: Path) -> None:
    model = inference.model_fn(str(efficientnet_dir))
    assert model.info["arch"] == "efficientnet_lite0" and model.image_size == 16
    answer, _ = predict(image_bytes("JPEG", (48, 48)), "image/jpeg", model)
    (prediction,) = json.loads(answer)["predictions"]
    assert prediction["predicted_count"] in (1, 2, 3, 4, 5)
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_handlers_load_as_a_top_level_module_as_in_sagemakers_container(efficientnet_dir: Path) -> None:
    """SageMaker imports ``inference`` with sm_scripts/ on sys.path; it finds its sibling modules all the same."""
    script = (
        "import json, sys, inference\n"
        "model = inference.model_fn(sys.argv[1])\n"
        "body = open(sys.argv[2], 'rb').read()\n"
        "print(inference.output_fn(inference.predict_fn(inference.input_fn(body, 'image/png'), model), None)[0])\n"
    )
    image = efficientnet_dir.parent / "probe.png"
    image.write_bytes(image_bytes("PNG", (48, 48)))
    result = subprocess.run(
        [sys.executable, "-c", script, str(efficientnet_dir), str(image)],
        cwd=SM_SCRIPTS,
        env={**os.environ, "PYTHONPATH": str(SM_SCRIPTS)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (prediction,) = json.loads(result.stdout)["predictions"]
    here = json.loads(predict(image.read_bytes(), "image/png", inference.model_fn(str(efficientnet_dir)))[0])
    assert prediction["predicted_count"] == here["predictions"][0]["predicted_count"]


def test_concurrent_requests_share_one_forward_and_each_gets_its_own_answer() -> None:
    """Micro-batching: six requests in flight together go through the model as one batch of six."""
    batch_sizes: list[int] = []

    def forward(pixels: torch.Tensor) -> list[float]:
        batch_sizes.append(len(pixels))
        return pixels[:, 0, 0, 0].tolist()  # each image's answer names the image

    batcher = MicroBatcher(forward, max_batch_size=8, max_wait_s=2.0, threads=1)
    batcher.start()

    async def requests() -> list[list[float]]:
        for _ in range(6):
            batcher.expect()  # as the host does when a request arrives, before it decodes
        return await asyncio.gather(*(batcher.submit(torch.full((1, 3, 2, 2), float(i))) for i in range(6)))

    try:
        answers = asyncio.run(requests())
    finally:
        batcher.stop()
    assert answers == [[float(i)] for i in range(6)]
    assert batch_sizes == [6] and (batcher.batches, batcher.images) == (1, 6)
