"""One preprocessing path: the same photo gives the network the same tensor in training and at the endpoint."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bincount.demo_data import jpeg_bytes, render_bin_image
from sm_scripts import inference
from sm_scripts.data import batches, load_channel
from sm_scripts.model_dir import model_info, write_model_dir
from sm_scripts.networks import NORMALIZATION, build_model
from sm_scripts.preprocessing import ImageError, channel_values, load_image

ABID_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "abid" / "bucket" / "bin-images"
IMAGE_SIZE = 64


def photos() -> dict[str, bytes]:
    """A synthetic bin photo (JPEG and PNG) and, where the ABID sample is present, a real one."""
    image = render_bin_image(3, np.random.default_rng(0), size=150)
    png = io.BytesIO()
    image.save(png, format="PNG")
    found = {"demo.jpg": jpeg_bytes(image), "demo.png": png.getvalue()}
    real = sorted(ABID_IMAGES.glob("*.jpg"))[:1] if ABID_IMAGES.is_dir() else []
    found.update({path.name: path.read_bytes() for path in real})
    return found


@pytest.fixture(scope="module", params=["resnet18", "efficientnet_lite0"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> inference.CountModel:
    """An untrained model dir as train.py writes it (each arch normalizes its own way), loaded by the endpoint."""
    arch = request.param
    torch.manual_seed(0)
    state = build_model(arch, 5).state_dict()
    model_dir = write_model_dir(tmp_path_factory.mktemp(arch), state, model_info(arch, [1, 2, 3, 4, 5], IMAGE_SIZE))
    return inference.model_fn(str(model_dir))


def training_tensor(tmp_path: Path, name: str, data: bytes, arch: str) -> torch.Tensor:
    """The batch train.py and evaluation feed the network for this one photo in a channel."""
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / name).write_bytes(data)
    cache = load_channel(tmp_path, ["3"], IMAGE_SIZE, threads=1)
    mean, std = (channel_values(values) for values in NORMALIZATION[arch])
    images, _ = next(batches(cache, 1, torch.device("cpu"), mean, std, shuffle=False))
    return images


@pytest.mark.parametrize("name", list(photos()))
def test_training_and_endpoint_give_the_network_the_same_tensor(
    tmp_path: Path, model: inference.CountModel, name: str
) -> None:
    data = photos()[name]
    expected = training_tensor(tmp_path, name, data, model.info["arch"])
    content_type = "image/png" if name.endswith(".png") else "image/jpeg"
    json_body = json.dumps({"images": [base64.b64encode(data).decode()]})
    for body, kind in [(data, content_type), (data, "application/x-image"), (json_body, "application/json")]:
        served = inference.model_input(inference.preprocess(inference.input_fn(body, kind), model), model)
        assert served.dtype == expected.dtype and served.shape == expected.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert torch.equal(served, expected), f"{name} as {kind}: max difference {(served - expected).abs().max()}"
    # and predict_fn answers what the network says to the training tensor
    with torch.inference_mode():
        logits = model.network(expected)
    (prediction,) = inference.predict_fn(inference.input_fn(data, content_type), model)
    assert prediction["predicted_count"] == model.classes[int(logits.argmax())]


def test_bytes_that_are_no_photo_name_the_problem() -> None:
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    truncated = photos()["demo.jpg"][:300]
    for data, says in [(b"", "empty"), (gif.getvalue(), "not a JPEG or PNG"), (truncated, "not a readable")]:
        with pytest.raises(ImageError, match=says):
            load_image(data, IMAGE_SIZE)
