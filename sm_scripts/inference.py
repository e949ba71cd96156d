"""Serving handlers for the bin-count model, in the SageMaker PyTorch serving contract.

SageMaker's PyTorch container (and the project's local host) calls:

    model_fn(model_dir)                    -> CountModel          (once, at start)
    input_fn(body, content_type)           -> list of N decoded images, uint8 [3, H, W] (per request)
    predict_fn(images, model)              -> list of N prediction dicts
    output_fn(predictions, accept)         -> (body, content type)

``predict_fn`` is ``forward(preprocess(images, model), model)``: a host that batches requests
runs ``preprocess`` (resize to uint8 [N, 3, S, S]) per request and one ``forward`` (normalize, then
the network) over many requests' pixels. Decoding, resizing and normalizing are
:mod:`sm_scripts.preprocessing`'s, the functions training uses: the same photo gives the network
the same tensor here as in training and evaluation.

Requests:
    image/jpeg, image/png, application/x-image   one JPEG or PNG image as the raw body
    application/json                             {"image": "<base64>"}, {"images": ["<base64>", ...]}
                                                 or ["<base64>", ...] (data: URI prefixes allowed)
Answers (``Accept``):
    application/json (default)   {"predictions": [{"predicted_count": 3,
                                                   "probabilities": {"1": 0.02, ..., "5": 0.01}}, ...]}
    text/csv                     one line per image: predicted_count,p_1,...,p_5 (no header)

The model directory holds ``model.pt`` (a state dict, loaded with ``weights_only=True``) and
``model_info.json`` (arch, classes, image_size, mean, std); ``networks.build_model`` builds the
network: one definition of every arch train.py trains. Where ``model_info.json`` names an
optimized form (``"optimized"``: an OpenVINO int8 IR that passed parity, see
:mod:`sm_scripts.optimized`) and it loads here, it runs the forward instead of the eager network;
otherwise the eager network serves and the reason is logged and kept in ``CountModel.serving``.
Both paths take the same normalized batch. Request bodies are only ever decoded
as images or JSON: nothing from a request is unpickled. Bad input raises :class:`InputError`
(its ``status_code`` is the HTTP answer) with a message that says what was expected; scores that come
out NaN or infinite raise :class:`NonFiniteScoresError` in ``output_fn`` (a 500: the model's fault).

Self-contained on purpose: SageMaker ships only this folder (the folder on ``sys.path``), so it
imports nothing from the project.
"""

from __future__ import annotations

if not __package__:  # a loose file, as SageMaker's serving container imports it (import inference): see _package.py
    import _package

    _package.register()

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sm_scripts.model_dir import load_network, read_model_info
from sm_scripts.networks import predict_classes
from sm_scripts.optimized import LogitsFn, OptimizedModelUnavailable, load_optimized
from sm_scripts.preprocessing import ImageError, TooManyPixelsError, channel_values, decode_image, normalize, resize

IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "application/x-image")
JSON_CONTENT_TYPE = "application/json"
CSV_CONTENT_TYPE = "text/csv"
SUPPORTED_CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, JSON_CONTENT_TYPE)
SUPPORTED_ACCEPTS = (JSON_CONTENT_TYPE, CSV_CONTENT_TYPE)
MAX_IMAGES_PER_REQUEST = 64
MAX_REQUEST_PIXELS = 32_000_000  # decoded, all images of a request together: ~96 MB of RGB, ~100 ABID photos

logger = logging.getLogger("sm_scripts.inference")


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


class NonFiniteScoresError(RuntimeError):
    """The model produced NaN or infinite scores: a fault of the model (a 500), not of the request."""


@dataclass
class CountModel:
    """The network and the preprocessing it was trained with."""

    network: torch.nn.Module
    classes: list[int]
    image_size: int
    mean: torch.Tensor  # [1, 3, 1, 1] float32, on device
    std: torch.Tensor  # [1, 3, 1, 1] float32, on device
    device: torch.device
    info: dict[str, Any]
    optimized: LogitsFn | None = None  # the optimized form's forward, when it serves
    serving: dict[str, str] = field(default_factory=dict)  # {"path": "eager" | "openvino-int8", "reason": why}


def _load_optimized(
    model_dir: str, info: dict[str, Any], device: torch.device
) -> tuple[LogitsFn | None, dict[str, str]]:
    """The optimized forward and the serving record; (None, why) where the eager network must serve."""
    entry = info.get("optimized")
    if entry is None:
        return None, {"path": "eager", "reason": "the model has no optimized form"}
    if device.type != "cpu":
        return None, {"path": "eager", "reason": f"the optimized form runs on CPU; this host has {device.type}"}
    try:
        run = load_optimized(model_dir, info, torch.get_num_threads())
    except OptimizedModelUnavailable as error:
        return None, {"path": "eager", "reason": f"the optimized form cannot serve here: {error}"}
    path = f"{entry['runtime']}-{entry['precision']}"
    parity = entry.get("parity", {})
    return run, {"path": path, "reason": f"it passed parity (top-1 agreement {parity.get('top1_agreement')})"}


def model_fn(model_dir: str) -> CountModel:
    """Build the network named in ``model_info.json``, load ``model.pt`` into it, and the optimized form if any.

    The optimized form runs with as many threads as torch has on the calling thread (a host sets
    them first). The eager network is loaded either way: it is the one reference the optimized
    form is checked against, and what serves when that form cannot.
    """
    info = read_model_info(model_dir)
    # Denormal floats can make CPU convolutions many times slower; flushing them changes no count.
    # The flag is per thread (and copied by threads it starts): this sets it for the serving thread.
    torch.set_flush_denormal(True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    network = load_network(model_dir, info).to(device, memory_format=torch.channels_last)  # as trained
    optimized, serving = _load_optimized(model_dir, info, device)
    fell_back = optimized is None and "optimized" in info
    logger.log(logging.WARNING if fell_back else logging.INFO, "serving %s: %s", serving["path"], serving["reason"])
    return CountModel(
        network=network,
        classes=[int(count) for count in info["classes"]],
        image_size=int(info["image_size"]),
        mean=channel_values(info["mean"], device),
        std=channel_values(info["std"], device),
        device=device,
        info=info,
        optimized=optimized,
        serving=serving,
    )


def _encoded_images(document: Any) -> list[Any]:
    """The list of encoded images a JSON request names."""
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
    return encoded


def _base64_images(body: bytes | str) -> list[bytes]:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"the body is not valid JSON ({error})") from None
    images = []
    for index, item in enumerate(_encoded_images(document)):
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


def input_fn(request_body: bytes | bytearray | str, request_content_type: str) -> list[torch.Tensor]:
    """Decode a request into its RGB images, uint8 [3, H, W] (one for an image body, one or more for JSON)."""
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
            images.append(decode_image(data, pixel_budget=budget))
        except TooManyPixelsError as error:
            raise PayloadTooLargeError(
                f"the images of one request may hold at most {MAX_REQUEST_PIXELS} pixels decoded, and "
                f"{'image ' + str(index) if len(encoded) > 1 else 'this image'} passes that ({error}): send fewer "
                "or smaller images per request, or use batch transform"
            ) from None
        except ImageError as error:
            raise InputError(f"image {index}: {error}" if len(encoded) > 1 else str(error)) from None
        budget -= images[-1].shape[1] * images[-1].shape[2]
    return images


def preprocess(images: list[torch.Tensor], model: CountModel) -> torch.Tensor:
    """Decoded images -> uint8 pixels [N, 3, S, S], resized to the model's square input.

    Hosts call this on several threads at once: resizing one image runs on the calling thread
    alone, and numpy stacks the results, since torch's copy would start a team of worker threads
    in each of those threads, beside the model's.
    """
    return torch.from_numpy(np.stack([resize(image, model.image_size).numpy() for image in images]))


def model_input(pixels: torch.Tensor, model: CountModel) -> torch.Tensor:
    """uint8 pixels [N, 3, S, S] -> the normalized float batch on the model's device, as training feeds it."""
    return normalize(pixels.to(model.device, non_blocking=True), model.mean, model.std)


def logits(pixels: torch.Tensor, model: CountModel) -> torch.Tensor:
    """uint8 pixels [N, 3, S, S] -> the logits [N, classes] of the path that serves (optimized or eager)."""
    with torch.inference_mode():
        batch = model_input(pixels, model)
        if model.optimized is not None:
            return torch.from_numpy(model.optimized(batch.contiguous().numpy()))
        return model.network(batch).float()


def forward(pixels: torch.Tensor, model: CountModel) -> list[dict[str, Any]]:
    """uint8 pixels [N, 3, S, S] (from :func:`preprocess`) -> one ``{"predicted_count", "probabilities"}``
    dict per image."""
    scores = logits(pixels, model)
    predicted = predict_classes(scores, model.info["decoding"]).tolist()
    probabilities = torch.softmax(scores, dim=1).cpu().numpy()
    return [
        {
            "predicted_count": model.classes[index],
            "probabilities": {str(count): round(float(p), 6) for count, p in zip(model.classes, row, strict=True)},
        }
        for index, row in zip(predicted, probabilities, strict=True)
    ]


def predict_fn(input_data: list[torch.Tensor], model: CountModel) -> list[dict[str, Any]]:
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


def check_finite(prediction: list[dict[str, Any]]) -> None:
    """Raise :class:`NonFiniteScoresError` where any image's probabilities are NaN or infinite.

    A model whose logits overflow on some inputs gives NaN probabilities there (and an argmax that means
    nothing): such an answer must fail, not go out as a count. Checked per request, so a request batched
    with a failing one still gets its answer.
    """
    bad = [
        index for index, item in enumerate(prediction) if not np.isfinite(list(item["probabilities"].values())).all()
    ]
    if bad:
        which = "this image" if len(prediction) == 1 else f"image(s) {bad} of this request"
        raise NonFiniteScoresError(
            f"the model produced non-finite scores (NaN or infinity) for {which}: the model is at fault, not the "
            "request (its numbers overflow on this input); serve the previous model and check or retrain this one"
        )


def output_fn(prediction: list[dict[str, Any]], accept: str | None) -> tuple[str, str]:
    """Serialise predictions as JSON (default) or CSV; returns ``(body, content type)``.

    Raises :class:`NonFiniteScoresError` rather than answer NaN or infinite scores.
    """
    check_finite(prediction)
    content_type = choose_accept(accept)
    if content_type == CSV_CONTENT_TYPE:
        lines = [
            ",".join([str(item["predicted_count"]), *(f"{p:.6f}" for p in item["probabilities"].values())])
            for item in prediction
        ]
        return "\n".join(lines) + "\n", CSV_CONTENT_TYPE
    return json.dumps({"predictions": prediction}), JSON_CONTENT_TYPE
