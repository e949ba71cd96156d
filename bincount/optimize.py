"""Optimize a trained model for CPU serving: OpenVINO IR, quantized to int8, checked for parity.

    model.tar.gz ─► convert (openvino.convert_model) ─► quantize (NNCF, calibrated on training images,
                    with accuracy control on the validation side: the most sensitive layers go back to
                    fp32 until int8's valid accuracy is within max_accuracy_drop of fp32's)
                 ─► parity on the test side, paired with eager image by image (check_parity: not worse
                    by a one-sided exact McNemar test, drop under a hard ceiling, top-1 agreement above a floor)
                 ─► passed: a NEW model.tar.gz = model.pt + optimized.xml/.bin + model_info.json["optimized"]
                    failed: the eager model stays; the reason is returned (and logged, and published by the task)

The trained archive is never rewritten: the registry and lineage may already name it. Serving
reads the optimized form through :mod:`sm_scripts.optimized`, the same loader the parity check
uses here, so what passed parity is what serves. Accuracy control tunes on the validation channel
only: the test side, which judges parity, is never seen before the check.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bincount.models import fetch_model, pack_folder
from bincount.stats import Interval, mcnemar_exact, paired_bootstrap
from bincount.storage import Storage
from sm_scripts.data import ImageCache, batches, channel_files, load_channel
from sm_scripts.model_dir import INFO_FILE, load_network, read_model_info
from sm_scripts.networks import predict_classes
from sm_scripts.optimized import (
    GRAPH_FILE,
    OptimizedModelUnavailable,
    load_optimized,
    optimized_entry,
)
from sm_scripts.preprocessing import channel_values, load_image

PRECISION = "int8"
CALIBRATION_IMAGES = 300  # NNCF's default subset size; more gave no better agreement here
MAX_ACCURACY_DROP = 0.005  # accuracy control's bar on the valid side: 0.5 points
PARITY_BATCH = 32
LAYER_TYPES = {"Convolution", "GroupConvolution", "MatMul"}  # what layers count as int8 or fp32
INT8_TYPES = {"i8", "u8"}  # element types of NNCF's quantized weight constants
EXPORT_TOOLS = ("openvino", "nncf")  # the converter and the quantizer export_int8 imports


@dataclass(frozen=True)
class ParityRule:
    """When the optimized form may serve instead of eager, judged on the test side, paired image by image.

    It fails when it is worse than eager with confidence (one-sided exact McNemar on the images only one of
    them gets right, at ``alpha``), when its accuracy drop passes ``max_drop`` whatever the test says, or when
    it gives the same count as eager on fewer than ``min_agreement`` of the images: quantizing the same network
    moves few answers, so a large change either way means a broken export.
    """

    alpha: float = 0.05
    max_drop: float = 0.02  # 2 points of test accuracy
    min_agreement: float = 0.85


@dataclass(frozen=True)
class ParityCheck:
    """The optimized form against eager on the same test images, and whether it passed ``rule``."""

    passed: bool
    reason: str
    images: int
    eager_accuracy: float
    optimized_accuracy: float
    top1_agreement: float
    disagreements: int  # images whose counts differ
    only_eager_right: int
    only_optimized_right: int
    p_value: float  # one-sided exact McNemar: the optimized form worse than eager
    accuracy_change: Interval  # optimized minus eager, 95% paired bootstrap
    rule: ParityRule
    test: str = "exact McNemar, one-sided (optimized worse than eager); 95% paired bootstrap interval"

    def measured(self) -> dict[str, Any]:
        """The figures an :class:`Optimization` carries."""
        keys = ("images", "eager_accuracy", "optimized_accuracy", "top1_agreement", "disagreements")
        keys += ("only_eager_right", "only_optimized_right", "p_value")
        return {key: getattr(self, key) for key in keys} | {"accuracy_change": self.accuracy_change}


@dataclass
class Optimization:
    """What the optimize stage did: ``model_uri`` is the model to register and deploy (optimized or the eager one)."""

    model_uri: str
    optimized: bool
    reason: str
    images: int = 0
    eager_accuracy: float | None = None
    optimized_accuracy: float | None = None
    top1_agreement: float | None = None
    disagreements: int = 0  # test images whose counts differ between eager and optimized
    only_eager_right: int = 0  # of those, the ones only eager counts right
    only_optimized_right: int = 0  # and the ones only the optimized form counts right
    p_value: float | None = None  # parity's one-sided exact McNemar (optimized worse than eager)
    accuracy_change: Interval | None = None  # optimized minus eager accuracy, 95% paired bootstrap
    calibration_images: int = 0
    validation_images: int = 0
    int8_layers: int = 0
    fp32_layers: int = 0  # reverted by accuracy control, or ones NNCF does not quantize
    seconds: float = 0.0
    export_failed: bool = False  # the tools failed, not the model: worth trying again (parity failures are not)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_batches(channel: Path, info: dict[str, Any], count: int, batch_size: int = 8) -> list[np.ndarray]:
    """Up to ``count`` training images, spread evenly over the channel's files (so over every class),
    normalized as serving normalizes them."""
    files, _ = channel_files(channel, [str(c) for c in info["classes"]])
    chosen = [files[int(i)] for i in np.linspace(0, len(files) - 1, min(count, len(files)))]
    pixels = torch.stack([load_image(path.read_bytes(), int(info["image_size"])) for path in chosen])
    mean, std = channel_values(info["mean"]), channel_values(info["std"])
    cache = ImageCache(pixels, torch.zeros(len(pixels), dtype=torch.long), [str(p) for p in chosen])
    return [x.contiguous().numpy() for x, _ in batches(cache, batch_size, torch.device("cpu"), mean, std, False)]


def validation_items(cache: ImageCache, info: dict[str, Any]) -> list[tuple[np.ndarray, int]]:
    """The validation channel as NNCF's accuracy control reads it: one (normalized image [1, 3, S, S], label)
    per item, so that it can score every image on its own when it ranks layers."""
    mean, std = channel_values(info["mean"]), channel_values(info["std"])
    items = []
    for x, y in batches(cache, PARITY_BATCH, torch.device("cpu"), mean, std, shuffle=False):
        items += [(image[None].contiguous().numpy(), int(label)) for image, label in zip(x, y, strict=True)]
    return items


def accuracy(
    compiled: Any, items: Iterable[tuple[np.ndarray, int]], decoding: str = "mode"
) -> tuple[float, list[float]]:
    """NNCF's validation function: the accuracy of an OpenVINO compiled model's counts (decoded as the model
    decodes them), and each item's hit (1 or 0)."""
    hits = [float(decoded(compiled(image)[0], decoding)[0] == label) for image, label in items]
    return float(np.mean(hits)), hits


def export_int8(
    network: torch.nn.Module,
    info: dict[str, Any],
    calibration: list[np.ndarray],
    validation: list[tuple[np.ndarray, int]],
    max_accuracy_drop: float,
    folder: Path,
) -> dict[str, int]:
    """Convert ``network`` to OpenVINO, quantize it to int8 on ``calibration`` with accuracy control on
    ``validation`` and save it as ``folder/optimized.*``; returns how many layers are int8 and fp32.

    ``nncf.quantize_with_accuracy_control`` quantizes as ``nncf.quantize`` does; when int8 then
    scores more than ``max_accuracy_drop`` below fp32 on ``validation`` it ranks the quantized layers
    by what each costs there and reverts the worst to fp32, one at a time, until the drop is within
    bounds (or nothing is left to revert; parity on the test side decides after it either way).
    """
    import nncf  # the export tools: installed with the project, not in the serving container
    import openvino

    size = int(info["image_size"])
    example = torch.zeros(1, 3, size, size)
    converted = openvino.convert_model(network, example_input=example, input=[(-1, 3, size, size)])
    quantized = nncf.quantize_with_accuracy_control(
        converted,
        nncf.Dataset(calibration),  # batches
        nncf.Dataset(validation, lambda item: item[0]),
        functools.partial(accuracy, decoding=info["decoding"]),
        max_drop=max_accuracy_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calibration),
    )
    openvino.save_model(quantized, str(folder / GRAPH_FILE), compress_to_fp16=False)
    return layer_precisions(quantized)


def export_tool_versions() -> dict[str, str | None]:
    """The installed version of each export tool (None: not installed); the stage's cache key holds them,
    so installing or upgrading one runs the stage again instead of serving a cached failure."""
    versions: dict[str, str | None] = {}
    for name in EXPORT_TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def export_failure(error: Exception) -> str:
    """The reason an export failed, and what to do about it (the eager model serves meanwhile)."""
    installed = ", ".join(f"{name} {version or 'not installed'}" for name, version in export_tool_versions().items())
    return (
        f"export failed: {type(error).__name__}: {str(error).strip() or 'no message'} ({installed}). The eager "
        "model serves. Install the export tools with the project (uv sync: openvino and nncf, at their locked "
        "versions) on the machine that runs the optimize stage, or, if they are there, see whether this "
        "network converts with openvino.convert_model; then run the pipeline again"
    )


def layer_precisions(model: Any) -> dict[str, int]:
    """How many convolutions and matrix products of an OpenVINO model have int8 weights (NNCF stores a
    quantized layer's weights as an int8 constant, converted and scaled) and how many stayed fp32."""
    counts = {"int8_layers": 0, "fp32_layers": 0}
    for op in model.get_ordered_ops():
        if op.get_type_name() in LAYER_TYPES:
            node = op.input_value(1).get_node()
            while node.get_type_name() in {"Multiply", "Subtract", "Convert"}:
                node = node.input_value(0).get_node()
            int8 = node.get_type_name() == "Constant" and node.get_output_element_type(0).get_type_name() in INT8_TYPES
            counts["int8_layers" if int8 else "fp32_layers"] += 1
    return counts


def decoded(logits: np.ndarray, decoding: str) -> np.ndarray:
    """The class indexes a batch of logits predicts, decoded as serving decodes them."""
    return predict_classes(torch.from_numpy(np.asarray(logits)), decoding).numpy()


def predictions(run: Any, cache: ImageCache, info: dict[str, Any]) -> np.ndarray:
    """Class indexes ``run`` (normalized batch -> logits) predicts for every image of ``cache``."""
    mean, std = channel_values(info["mean"]), channel_values(info["std"])
    out = [run(x) for x, _ in batches(cache, PARITY_BATCH, torch.device("cpu"), mean, std, shuffle=False)]
    return decoded(np.concatenate(out), info["decoding"])


def optimize_model(
    storage: Storage,
    model_uri: str,
    train_channel_uri: str,
    valid_channel_uri: str,
    test_channel_uri: str,
    output_uri: str,
    calibration_images: int = CALIBRATION_IMAGES,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    parity: ParityRule | None = None,
) -> Optimization:
    """Quantize the model at ``model_uri`` (calibrated on the train channel, accuracy-controlled on the
    valid one to within ``max_accuracy_drop``); write the optimized archive to ``output_uri`` if it passes
    ``parity`` (default :class:`ParityRule`) on the test channel.

    An export that fails (the converter or NNCF missing or refusing the network) or a model that fails
    parity leaves ``model_uri`` as the model to use, with the reason; nothing is written then.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="optimize-") as scratch:
        fetched, _ = fetch_model(storage, model_uri, Path(scratch) / "models")
        folder = Path(scratch) / "optimized"
        shutil.copytree(fetched, folder)
        info = read_model_info(folder)
        if "optimized" in info:
            return Optimization(model_uri, True, "the model already holds an optimized form")
        network = load_network(folder, info).to(memory_format=torch.channels_last)
        train = storage.local_folder(train_channel_uri, Path(scratch) / "train")
        calibration = calibration_batches(train, info, calibration_images)
        calibrated = sum(len(b) for b in calibration)
        classes, size, threads = [str(c) for c in info["classes"]], int(info["image_size"]), torch.get_num_threads()
        valid = load_channel(storage.local_folder(valid_channel_uri, Path(scratch) / "valid"), classes, size, threads)
        validation = validation_items(valid, info)
        try:  # only the third-party step: a failure in our own data or parity code still fails the stage
            layers = export_int8(network, info, calibration, validation, max_accuracy_drop, folder)
        except Exception as error:  # the converter or quantizer missing, too old, or refusing the network
            return Optimization(model_uri, False, export_failure(error), seconds=_since(start), export_failed=True)
        test = storage.local_folder(test_channel_uri, Path(scratch) / "test")
        cache = load_channel(test, classes, size, threads)
        with torch.inference_mode():
            eager = predictions(lambda x: network(x).numpy(), cache, info)
        try:
            run = load_optimized(folder, {**info, "optimized": optimized_entry(PRECISION, {})}, threads)
        except OptimizedModelUnavailable as error:
            return Optimization(model_uri, False, f"the exported model does not load: {error}", seconds=_since(start))
        optimized = predictions(lambda x: run(x.contiguous().numpy()), cache, info)
        check = check_parity(cache.labels.numpy(), eager, optimized, parity)
        quantized = {"calibration_images": calibrated, "validation_images": len(valid.labels), **layers}
        if not check.passed:
            return Optimization(model_uri, False, check.reason, **check.measured(), **quantized, seconds=_since(start))
        record = {**asdict(check), "max_accuracy_drop": max_accuracy_drop, **quantized}
        info["optimized"] = optimized_entry(PRECISION, record)
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2))
        archive = pack_folder(folder, Path(scratch) / "model.tar.gz")
        storage.upload_file(archive, output_uri)
    return Optimization(output_uri, True, check.reason, **check.measured(), **quantized, seconds=_since(start))


def check_parity(
    truth: np.ndarray, eager: np.ndarray, optimized: np.ndarray, rule: ParityRule | None = None
) -> ParityCheck:
    """Judge the optimized form's counts against eager's on the same images by ``rule`` (see :class:`ParityRule`).

    The paired test, not a bar on the accuracy gap: on 460 test images one image is 0.2 points and the gap
    between two forms of one network wanders by a point either way, so a fixed 0.5-point bar passed or failed
    the same recipe's int8 by chance; the test fails it only when the images it loses outnumber the ones it
    gains by more than chance allows.
    """
    rule = rule or ParityRule()
    truth, eager, optimized = np.asarray(truth), np.asarray(eager), np.asarray(optimized)
    eager_right, optimized_right = eager == truth, optimized == truth
    test = mcnemar_exact(int(np.sum(eager_right & ~optimized_right)), int(np.sum(optimized_right & ~eager_right)))
    change = paired_bootstrap(truth, eager, optimized).accuracy
    eager_accuracy, optimized_accuracy = float(np.mean(eager_right)), float(np.mean(optimized_right))
    disagreements = int(np.sum(eager != optimized))
    agreement = 1 - disagreements / len(truth)
    figures = (
        f"int8 test accuracy {optimized_accuracy:.4f}, eager {eager_accuracy:.4f} ({change.points()}, 95% paired "
        f"bootstrap); {test.only_a} images only eager gets right, {test.only_b} only int8 (exact McNemar, one-sided "
        f"p={test.p_a_better:.3g}); top-1 agreement {agreement:.4f} ({disagreements} disagreements) on "
        f"{len(truth)} images"
    )
    drop = eager_accuracy - optimized_accuracy
    if agreement < rule.min_agreement:
        passed, why = False, f"agreement under the floor of {rule.min_agreement:.2f}: the export looks broken"
    elif drop > rule.max_drop + 1e-9:  # 0.9 - 0.88 is 0.020000000000000018 in floats
        passed, why = False, f"{100 * drop:.2f} points below eager, past the ceiling of {100 * rule.max_drop:.2f}"
    elif test.p_a_better < rule.alpha:
        passed, why = False, f"worse than eager at alpha {rule.alpha}"
    else:
        passed, why = True, f"not worse than eager at alpha {rule.alpha}"
    return ParityCheck(
        passed=passed,
        reason=f"{'passed parity' if passed else 'parity failed'}: {why}: {figures}",
        images=len(truth),
        eager_accuracy=eager_accuracy,
        optimized_accuracy=optimized_accuracy,
        top1_agreement=agreement,
        disagreements=disagreements,
        only_eager_right=test.only_a,
        only_optimized_right=test.only_b,
        p_value=test.p_a_better,
        accuracy_change=change,
        rule=rule,
    )


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 1)
