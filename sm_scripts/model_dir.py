"""The model directory (docs/CONTRACTS.md): train.py writes it, inference.py and evaluation read it.

model.pt          the state dict only: torch.load(path, weights_only=True) loads it
model_info.json   arch, classes, image_size, mean, std, head, hyperparameters, metrics; and ``optimized`` where
                  the optimize stage added an int8 form (:mod:`sm_scripts.optimized`, docs/CONTRACTS.md)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sm_scripts.networks import ARCHS, DECODINGS, HEADS, NORMALIZATION, build_model

MODEL_FILE = "model.pt"
INFO_FILE = "model_info.json"
REQUIRED_INFO = ("arch", "classes", "image_size", "mean", "std")


def model_info(
    arch: str,
    classes: list[int | str],
    image_size: int,
    hyperparameters: dict[str, Any] | None = None,
    *,
    metrics: dict[str, Any] | None = None,
    head: str = "linear",
    decoding: str = "mode",
) -> dict[str, Any]:
    """``model_info.json``'s content; the normalization is the arch's (:data:`NORMALIZATION`)."""
    mean, std = NORMALIZATION[arch]
    return {
        "arch": arch,
        "classes": list(classes),
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "head": head,
        "decoding": decoding,
        "hyperparameters": hyperparameters or {},
        "metrics": metrics or {},
    }


def write_model_dir(model_dir: Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write ``model.pt`` (``state``, a state dict) and ``model_info.json`` (``info``, see :func:`model_info`)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, model_dir / MODEL_FILE)
    (model_dir / INFO_FILE).write_text(json.dumps(info, indent=2))
    return model_dir


def read_model_info(model_dir: Path | str) -> dict[str, Any]:
    """``model_info.json`` of ``model_dir``, checked; ``head`` and ``decoding`` filled in (``linear``,
    ``mode``) where it was written before they were recorded.

    Raises:
        FileNotFoundError: there is none.
        ValueError: it lacks a key, or names an arch that train.py does not train.
    """
    path = Path(model_dir) / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: a model dir holds {MODEL_FILE} and {INFO_FILE}") from None
    missing = [key for key in REQUIRED_INFO if key not in info]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it needs {', '.join(REQUIRED_INFO)}")
    if info["arch"] not in ARCHS:
        raise ValueError(f"{path}: arch {info['arch']!r} is not one of {list(ARCHS)}, the archs train.py trains")
    info = {"head": "linear", "decoding": "mode", **info}
    if info["head"] not in HEADS:
        raise ValueError(f"{path}: head {info['head']!r} is not one of {list(HEADS)}, the heads train.py trains")
    if info["decoding"] not in DECODINGS:
        raise ValueError(f"{path}: decoding {info['decoding']!r} is not one of {list(DECODINGS)}")
    return info


def load_network(model_dir: Path | str, info: dict[str, Any]) -> nn.Module:
    """The network ``info`` names, in eval mode, with ``model.pt``'s weights (loaded ``weights_only``: no
    code is unpickled)."""
    network = build_model(info["arch"], len(info["classes"]), head=info.get("head", "linear"))  # older: linear
    network.load_state_dict(torch.load(Path(model_dir) / MODEL_FILE, map_location="cpu", weights_only=True))
    return network.eval()
