"""Serving handlers for the bin-count model, in the SageMaker PyTorch serving contract.

SageMaker's PyTorch container (and the local host in ``bincount.serving``) calls:

    model_fn(model_dir)                    -> CountModel          (once, at start)
    input_fn(body, content_type)           -> list of N RGB images (per request)
    predict_fn(images, model)              -> list of N prediction dicts
    output_fn(predictions, accept)         -> (body, content type)

``predict_fn`` is ``forward(preprocess(images, model), model)``: a host that batches requests
runs ``preprocess`` per request and one ``forward`` over many requests' pixels.

Requests:
    image/jpeg, image/png, application/x-image   one JPEG or PNG image as the raw body
    application/json                             {"image": "<base64>"}, {"images": ["<base64>", ...]}
                                                 or ["<base64>", ...] (data: URI prefixes allowed)
Answers (``Accept``):
    application/json (default)   {"predictions": [{"predicted_count": 3,
                                                   "probabilities": {"1": 0.02, ..., "5": 0.01}}, ...]}
    text/csv                     one line per image: predicted_count,p_1,...,p_5 (no header)

The model directory holds ``model.pt`` (a state dict, loaded with ``weights_only=True``) and
``model_info.json`` (arch, classes, image_size, mean, std). The network is built by train.py's
``build_model``: one definition of every arch it trains. Request bodies are only ever decoded
as images or JSON: nothing from a request is unpickled. Bad input raises :class:`InputError`
(its ``status_code`` is the HTTP answer) with a message that says what was expected.

Self-contained on purpose: SageMaker ships only this folder (train.py beside this file, the folder
on ``sys.path``), so it imports nothing from the project.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

if __package__:
    from .train import ARCHS, build_model
else:  # imported as a top-level module (SageMaker's serving container puts this folder on sys.path)
    from train import ARCHS, build_model

IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image")
JSON_CONTENT_TYPE = "application/json"
CSV_CONTENT_TYPE = "text/csv"
SUPPORTED_CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, JSON_CONTENT_TYPE)
SUPPORTED_ACCEPTS = (JSON_CONTENT_TYPE, CSV_CONTENT_TYPE)
IMAGE_FORMATS = ("JPEG", "PNG")
MAX_IMAGES_PER_REQUEST = 64
MAX_IMAGE_PIXELS = 16_000_000  # far above any bin photo; stops decompression bombs early
MAX_REQUEST_PIXELS = 32_000_000  # decoded, all images of a request together: ~96 MB of RGB, ~100 ABID photos


class InputError(ValueError):
    """The request cannot be answered as sent; ``status_code`` is the HTTP status to answer with."""

    status_code = 400


class UnsupportedContentTypeError(InputError):
    status_code = 415


class UnsupportedAcceptError(InputError):
    status_code = 406


class PayloadTooLargeError(InputError):
    """The request's images would decode to more than ``MAX_REQUEST_PIXELS`` pixels."""

    status_code = 413


@dataclass
class CountModel:
    """The network and the preprocessing it was trained with."""

    network: torch.nn.Module
    classes: list[int]
    image_size: int
    mean: np.ndarray  # [3], float32
    std: np.ndarray  # [3], float32
    device: torch.device
    info: dict[str, Any]


def _read_model_info(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, "model_info.json")
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: a model dir holds model.pt and model_info.json") from None
    missing = [key for key in ("arch", "classes", "image_size", "mean", "std") if key not in info]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it needs arch, classes, image_size, mean and std")
    if info["arch"] not in ARCHS:
        raise ValueError(f"{path}: arch {info['arch']!r} is not one of {list(ARCHS)}, the archs train.py trains")
    return info


def model_fn(model_dir: str) -> CountModel:
    """Build the network named in ``model_info.json`` and load ``model.pt`` into it."""
    info = _read_model_info(model_dir)
    # Denormal floats can make CPU convolutions many times slower; flushing them changes no count.
    # The flag is per thread (and copied by threads it starts): this sets it for the serving thread.
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = [int(count) for count in info["classes"]]
    network = build_model(info["arch"], len(classes), weights="none", freeze_backbone=False)
    state = torch.load(os.path.join(model_dir, "model.pt"), map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    network.eval().to(device)
    if device.type == "cpu":
        network = network.to(memory_format=torch.channels_last)  # oneDNN's fast layout on CPU
    return CountModel(
        network=network,
        classes=classes,
        image_size=int(info["image_size"]),
        mean=np.asarray(info["mean"], dtype=np.float32),
        std=np.asarray(info["std"], dtype=np.float32),
        device=device,
        info=info,
    )


def decode_image(data: bytes, pixel_budget: int = MAX_REQUEST_PIXELS) -> Image.Image:
    """JPEG or PNG bytes -> a decoded RGB image. Sizes are read from the header and checked before
    anything is decoded; ``pixel_budget`` is what the request has left of ``MAX_REQUEST_PIXELS``.

    Raises:
        InputError: the bytes are not a complete JPEG or PNG image.
        PayloadTooLargeError: the image would pass the request's pixel budget.
    """
    if not data:
        raise InputError("the image is empty: send the bytes of a JPEG or PNG image")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InputError(f"the image is {image.width}x{image.height}: at most {MAX_IMAGE_PIXELS} pixels")
            if image.width * image.height > pixel_budget:
                raise PayloadTooLargeError(
                    f"the images of one request may hold at most {MAX_REQUEST_PIXELS} pixels decoded, and this "
                    f"{image.width}x{image.height} image passes that: send fewer or smaller images per request, "
                    "or use batch transform"
                )
            image.load()  # decode now, so that truncated or corrupt data fails here
            return image.convert("RGB")
    except InputError:
        raise
    except Image.UnidentifiedImageError:
        raise InputError("the body is not a JPEG or PNG image: its first bytes match neither format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL reports unknown formats, truncation and corrupt streams as these
        raise InputError(f"the body is not a readable JPEG or PNG image ({error})") from None


def _base64_images(body: bytes | str) -> list[bytes]:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"the body is not valid JSON ({error})") from None
    if isinstance(document, dict) and "image" in document:
        encoded = [document["image"]]
    elif isinstance(document, dict) and "images" in document:
        encoded = document["images"]
    elif isinstance(document, list):
        encoded = document
    else:
        raise InputError('JSON must be {"image": "<base64>"}, {"images": ["<base64>", ...]} or ["<base64>", ...]')
    if not isinstance(encoded, list) or not encoded:
        raise InputError("JSON names no images: give one or more base64 strings")
    if len(encoded) > MAX_IMAGES_PER_REQUEST:
        raise InputError(f"{len(encoded)} images in one request: at most {MAX_IMAGES_PER_REQUEST}")
    images = []
    for index, item in enumerate(encoded):
        if not isinstance(item, str):
            raise InputError(f"image {index} is a JSON {type(item).__name__}, not a base64 string")
        if item.startswith("data:") and "," in item:
            item = item.split(",", 1)[1]  # a data URI: keep the payload
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as error:
            raise InputError(f"image {index} is not valid base64 ({error})") from None
    return images


def _media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def input_fn(request_body: bytes | str, request_content_type: str) -> list[Image.Image]:
    """Decode a request into its RGB images (one for an image body, one or more for JSON)."""
    content_type = _media_type(request_content_type)
    if isinstance(request_body, str):
        request_body = request_body.encode("utf-8")
    if content_type in IMAGE_CONTENT_TYPES:
        encoded = [request_body]
    elif content_type == JSON_CONTENT_TYPE:
        if not request_body:
            raise InputError("the body is empty: send JSON with base64 images")
        encoded = _base64_images(request_body)
    else:
        raise UnsupportedContentTypeError(
            f"content type {request_content_type!r} is not supported: use one of {list(SUPPORTED_CONTENT_TYPES)}"
        )
    images, budget = [], MAX_REQUEST_PIXELS
    for index, data in enumerate(encoded):
        try:
            images.append(decode_image(data, budget))
        except InputError as error:
            if len(encoded) == 1:
                raise
            raise type(error)(f"image {index}: {error}") from None
        budget -= images[-1].width * images[-1].height
    return images


def preprocess(images: list[Image.Image], model: CountModel) -> torch.Tensor:
    """RGB images -> normalised pixels [N, 3, S, S], resized to the model's square input.

    Plain numpy on purpose: hosts call this on several threads at once, and torch ops there would
    each start their own team of worker threads beside the model's. The result is laid out
    channels-last in memory (NHWC viewed as NCHW), the layout the CPU forward wants.
    """
    size = (model.image_size, model.image_size)
    pixels = np.stack([np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) for image in images])
    pixels = (pixels * np.float32(1 / 255.0) - model.mean) / model.std
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def forward(pixels: torch.Tensor, model: CountModel) -> list[dict[str, Any]]:
    """Normalised pixels [N, 3, S, S] -> one ``{"predicted_count", "probabilities"}`` dict per image."""
    pixels = pixels.to(model.device, non_blocking=True)
    if model.device.type == "cpu":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        probabilities = torch.softmax(model.network(pixels).float(), dim=1).cpu().numpy()
    return [
        {
            "predicted_count": model.classes[int(row.argmax())],
            "probabilities": {str(count): round(float(p), 6) for count, p in zip(model.classes, row)},
        }
        for row in probabilities
    ]


def predict_fn(input_data: list[Image.Image], model: CountModel) -> list[dict[str, Any]]:
    """Images -> one prediction dict per image."""
    return forward(preprocess(input_data, model), model)


def choose_accept(accept: str | None) -> str:
    """The answer type for an ``Accept`` header: the first supported one listed; JSON when any will do."""
    if not accept or not accept.strip():
        return JSON_CONTENT_TYPE
    for part in accept.split(","):
        media = _media_type(part)
        if media in SUPPORTED_ACCEPTS:
            return media
        if media in ("*/*", "application/*"):
            return JSON_CONTENT_TYPE
        if media == "text/*":
            return CSV_CONTENT_TYPE
    raise UnsupportedAcceptError(f"Accept {accept!r} is not supported: use one of {list(SUPPORTED_ACCEPTS)}")


def output_fn(prediction: list[dict[str, Any]], accept: str | None) -> tuple[str, str]:
    """Serialise predictions as JSON (default) or CSV; returns ``(body, content type)``."""
    content_type = choose_accept(accept)
    if content_type == CSV_CONTENT_TYPE:
        lines = [
            ",".join([str(item["predicted_count"]), *(f"{p:.6f}" for p in item["probabilities"].values())])
            for item in prediction
        ]
        return "\n".join(lines) + "\n", CSV_CONTENT_TYPE
    return json.dumps({"predictions": prediction}), JSON_CONTENT_TYPE
