"""TorchServe 0.12 handler serving a project model dir with the project's own inference code.

``benchmarks/torchserve_baseline.py`` archives ``model.pt``, ``model_info.json`` and the files of
``sm_scripts`` with this file; TorchServe unpacks them into one folder on ``sys.path``, where
``inference`` imports as a loose file, as in SageMaker's container (it registers its folder as the
package ``sm_scripts``). Each request is decoded and resized by ``sm_scripts.inference`` (the preprocessing
training uses), the batch TorchServe gathered runs one ``forward`` (normalize, network), and each
request gets the local endpoint's JSON answer: the same tensors and work as the local endpoint, in
TorchServe's frontend, queue and worker.

Torch threads come from the archive's ``model-config.yaml`` (``handler: {threads: N}``): TorchServe
has no setting for them and its workers would otherwise take every core each.
"""

from __future__ import annotations

from typing import Any

import inference  # sm_scripts/inference.py, beside this file in the archive
import torch

_model: inference.CountModel | None = None


def _body(request: dict[str, Any]) -> bytes:
    """A request's raw body (TorchServe names it ``body`` or ``data``)."""
    body = request.get("body") or request.get("data") or b""
    return bytes(body) if isinstance(body, bytearray) else body


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
    """One TorchServe batch: a JSON answer per request, in order; a bad request answers its own error."""
    global _model
    if _model is None:
        threads = (context.model_yaml_config or {}).get("handler", {}).get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        _model = inference.model_fn(context.system_properties["model_dir"])
    if data is None:  # TorchServe's load-time call
        return None
    answers: list[str | None] = [None] * len(data)
    pixels, served = [], []
    for index, request in enumerate(data):
        headers = {k.lower(): v for k, v in (context.get_all_request_header(index) or {}).items()}
        try:
            images = inference.input_fn(_body(request), headers.get("content-type", "image/jpeg"))
        except inference.InputError as error:
            context.set_response_status(code=error.status_code, phrase=str(error), idx=index)
            answers[index] = str(error)
            continue
        pixels.append(inference.preprocess(images, _model))
        served.append((index, len(images)))
    if pixels:
        predictions = inference.forward(torch.cat(pixels), _model)
        start = 0
        for index, count in served:
            answers[index], _ = inference.output_fn(predictions[start : start + count], "application/json")
            start += count
    return [answer or "" for answer in answers]
