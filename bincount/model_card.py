"""A model card for a registered version: the evidence a reviewer decides on, as one record and one markdown page.

    challenger dir ─┐                        ┌─ lineage, data, recipe          (the version's record)
    champion dir ───┼─ both score the same ──┼─ metrics with intervals, paired test, per-class and confusion change
    test channel ───┘   test images          ├─ calibration (reliability plot, ECE), int8 parity
                                             └─ gallery: photos they disagree on, Grad-CAM of each model

Both models score the test channel as they serve (their int8 form where it loads, :func:`sm_scripts.inference.model_fn`
decides), so the card's figures are the ones a nightly compares. Saliency is Grad-CAM (Selvaraju et al., 2017) on
the eager network's last convolutional block, for the count each model predicts. Plots and photos are PNG
``data:`` URIs inside the markdown, so the page renders offline (a Prefect markdown artifact, a file viewer); the
gallery has a byte budget, so the page stays well under a megabyte.

Example:
    >>> card = build_model_card(challenger_dir, test_channel, version, champion_dir, champion_name="bincount:2")
    >>> write_model_card(storage, version_folder_uri, card)
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from torch import nn

from bincount.contracts.registry import ModelVersion
from bincount.evaluation import score_counts
from bincount.split import SPLITS, read_split
from bincount.stats import Interval, PairedComparison, bootstrap_scores, compare_paired
from bincount.storage import ObjectNotFoundError, Storage, join_uri
from sm_scripts.data import ImageCache, batches, load_channel
from sm_scripts.inference import CountModel, model_fn
from sm_scripts.model_dir import read_model_info
from sm_scripts.networks import LITE_SCALING, predict_classes
from sm_scripts.preprocessing import load_image, normalize

CARD_FILE = "card.md"
RECORD_FILE = "card.json"
GALLERY_SIZE = 8
THUMBNAIL_PX = 128
GALLERY_BUDGET_BYTES = 600_000  # the gallery's PNGs, base64: past it no more photos are added
RELIABILITY_BINS = 10
_NOT_IN_RECORD = ("markdown", "champion_saliency", "challenger_saliency", "strip")  # the page's and the object's


class ModelCardError(ValueError):
    """The models cannot be compared on the test channel as given; the message says why."""


@dataclass(frozen=True)
class Lineage:
    """Where the version came from: its model and data, the code and job that made it, the flow run that asked."""

    version: str
    model_uri: str
    model_sha256: str
    split_uri: str
    split_sha256: str
    code_hash: str
    training_job: str
    flow_run_id: str | None
    flow_run_url: str | None
    created_at: str


@dataclass(frozen=True)
class DataSummary:
    """Images per side as registered, and per count: every side where the split manifest was read, the test
    channel's otherwise (``class_balance[side][count]``)."""

    sides: dict[str, int]
    class_balance: dict[str, dict[str, int]]
    test_images: int


@dataclass(frozen=True)
class ModelScores:
    """One model on the test images, as it serves (``serving``: eager or its int8 form)."""

    name: str
    serving: str
    accuracy: Interval
    rmse: Interval
    within_one: Interval
    per_class_accuracy: dict[str, float]
    confusion: list[list[int]]  # [true][predicted], in the card's class order


@dataclass(frozen=True)
class ReliabilityBin:
    """Images whose predicted-class probability lies in ``[low, high)`` (the last bin holds 1.0 too)."""

    low: float
    high: float
    images: int
    confidence: float  # their mean predicted-class probability
    accuracy: float  # the share of them predicted right


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error over the non-empty bins: sum of ``images / N * |accuracy - confidence|``."""

    ece: float
    bins: tuple[ReliabilityBin, ...]


@dataclass(frozen=True)
class GalleryItem:
    """A test photo the models count differently; each saliency map is at that model's input size, in [0, 1].
    ``strip``: the photo, the champion's map over it and the challenger's, side by side, as a PNG data URI (the
    page's, not card.json's)."""

    file: str  # relative to the test channel: <count>/<id>.jpg
    truth: int
    champion: int
    challenger: int
    champion_saliency: np.ndarray = field(repr=False, compare=False)
    challenger_saliency: np.ndarray = field(repr=False, compare=False)
    strip: str = field(repr=False, compare=False, default="")


@dataclass(frozen=True)
class ModelCard:
    """The card of ``lineage.version``; ``markdown`` is its page. The champion's fields are None without one."""

    lineage: Lineage
    data: DataSummary
    recipe: dict[str, Any]  # train.py flags, the pipeline's options, and what model_info.json says of the network
    classes: list[int]
    challenger: ModelScores
    champion: ModelScores | None
    comparison: PairedComparison | None
    per_class_delta: dict[str, float]  # challenger minus champion accuracy per count
    confusion_change: list[list[int]] | None  # challenger minus champion
    calibration: dict[str, Calibration]  # "challenger", "champion"
    parity: dict[str, Any] | None  # model_info.json's optimized.parity
    disagreements: int  # test images the two models count differently
    gallery: tuple[GalleryItem, ...]
    markdown: str = field(repr=False, default="")

    def to_dict(self) -> dict[str, Any]:
        """The record without the page and the saliency arrays (card.json)."""
        return asdict(self, dict_factory=lambda items: {k: v for k, v in items if k not in _NOT_IN_RECORD})


@dataclass
class _Scored:
    """One model's answers on the test channel, in the channel's file order."""

    served: CountModel
    cache: ImageCache
    files: list[str]
    truth: np.ndarray  # true counts
    predicted: np.ndarray  # counts as served
    confidence: np.ndarray  # the served scores' softmax at the predicted class


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = RELIABILITY_BINS) -> Calibration:
    """Predicted-class confidence against accuracy in ``bins`` equal-width bins, and the expected calibration
    error (Guo et al., 2017)."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=bool)
    if len(confidence) == 0 or len(confidence) != len(correct):
        raise ValueError(f"need one correctness per confidence, at least one: {len(confidence)} vs {len(correct)}")
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    kept, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            mean_confidence, accuracy = float(confidence[inside].mean()), float(correct[inside].mean())
            kept.append(ReliabilityBin(b / bins, (b + 1) / bins, int(inside.sum()), mean_confidence, accuracy))
            ece += inside.sum() / len(confidence) * abs(accuracy - mean_confidence)
    return Calibration(float(ece), tuple(kept))


def saliency_layer(network: nn.Module, arch: str) -> nn.Module:
    """The last convolutional block: a ResNet's ``layer4``, an EfficientNet-Lite's last MBConv block."""
    return network._blocks[-1] if arch in LITE_SCALING else network.layer4


def grad_cam(network: nn.Module, layer: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (N, S, S) in [0, 1] of normalized ``images`` (N, 3, S, S) for class indexes ``targets``:
    ``layer``'s activations weighted by the spatial mean of the target score's gradient, ReLU, upsampled
    bilinearly to the image and scaled to a peak of 1 (all zero where nothing speaks for the class)."""
    kept: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: kept.append(output))
    try:
        with torch.enable_grad():
            scores = network(images)
            (gradients,) = torch.autograd.grad(scores.gather(1, targets[:, None]).sum(), kept[0])
    finally:
        handle.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * kept[0]).sum(1, keepdim=True).detach())
    cam = nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]


def _score(model_dir: Path, test_channel: Path) -> _Scored:
    served = model_fn(str(model_dir))
    info, classes = served.info, np.asarray(served.classes)
    cache = load_channel(test_channel, [str(c) for c in classes], served.image_size, torch.get_num_threads())
    predicted, confidence = [], []
    with torch.inference_mode():
        for images, _ in batches(cache, 64, torch.device("cpu"), served.mean.cpu(), served.std.cpu(), shuffle=False):
            if served.optimized is not None:
                scores = torch.from_numpy(served.optimized(images.contiguous().numpy())).float()
            else:
                scores = served.network(images.to(served.device)).float().cpu()
            chosen = predict_classes(scores, info["decoding"])
            predicted.append(chosen.numpy())
            confidence.append(scores.softmax(1).gather(1, chosen[:, None])[:, 0].numpy())
    files = [str(Path(f).relative_to(test_channel)) for f in cache.files]
    truth = classes[cache.labels.numpy()]
    return _Scored(served, cache, files, truth, classes[np.concatenate(predicted)], np.concatenate(confidence))


def _saliency(scored: _Scored, rows: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    served = scored.served
    index = torch.as_tensor(rows, dtype=torch.long)
    images = normalize(scored.cache.take(index).to(served.device), served.mean, served.std)
    targets = torch.as_tensor([served.classes.index(int(c)) for c in counts], device=served.device)
    layer = saliency_layer(served.network, served.info["arch"])
    return list(grad_cam(served.network, layer, images, targets).cpu().numpy())


def _model_scores(
    name: str, serving: str, truth: np.ndarray, predicted: np.ndarray, classes: list[int], confidence: float
) -> ModelScores:
    evaluation = score_counts(truth.tolist(), predicted.tolist(), classes)
    intervals = bootstrap_scores(truth, predicted, confidence)
    return ModelScores(
        name=name,
        serving=serving,
        accuracy=intervals.accuracy,
        rmse=intervals.rmse,
        within_one=intervals.within_one,
        per_class_accuracy=evaluation.per_class_accuracy,
        confusion=evaluation.confusion,
    )


def _class_balance(storage: Storage | None, split_uri: str, truth: np.ndarray) -> dict[str, dict[str, int]]:
    """Images per count on each side of the split manifest, or on the test channel where it cannot be read."""
    if storage is not None:
        try:
            table = read_split(storage, split_uri)
        except ObjectNotFoundError:
            pass
        else:
            return {
                str(side): {str(label): int(n) for label, n in sorted(labels.value_counts().items())}
                for side, labels in table.groupby("split")["label"]
            }
    labels, counts = np.unique(truth, return_counts=True)
    return {"test": {str(int(label)): int(n) for label, n in zip(labels, counts, strict=True)}}


def _gallery_order(champion_right: np.ndarray, challenger_right: np.ndarray) -> np.ndarray:
    """Positions of the disagreements in the gallery's order: images only the challenger gets right and images
    only the champion gets right taken in turn, then those both miss; each kind in the channel's order."""
    kind = np.where(challenger_right, 0, np.where(champion_right, 1, 2))
    turn = np.zeros(len(kind), dtype=int)
    for k in range(3):
        turn[kind == k] = np.arange(np.sum(kind == k))
    return np.lexsort((kind, turn, kind == 2))


def _gallery(
    test_channel: Path, challenger: _Scored, champion: _Scored, chosen: np.ndarray, px: int
) -> tuple[GalleryItem, ...]:
    """The gallery of the images at positions ``chosen``, photos ``px`` square, each with both models' Grad-CAM;
    it stops early where its PNGs pass :data:`GALLERY_BUDGET_BYTES`."""
    if not len(chosen):
        return ()
    champion_counts = champion.predicted[chosen]
    challenger_maps = _saliency(challenger, chosen, challenger.predicted[chosen])
    champion_maps = _saliency(champion, chosen, champion_counts)
    items: list[GalleryItem] = []
    spent = 0
    for i, champion_count, champion_map, challenger_map in zip(
        chosen, champion_counts, champion_maps, challenger_maps, strict=True
    ):
        photo = load_image((test_channel / challenger.files[i]).read_bytes(), px).permute(1, 2, 0).numpy()
        gap = np.full((px, px // 32, 3), 255, dtype=np.uint8)
        strip = _data_uri(
            _photo_png(np.hstack([photo, gap, _overlay(photo, champion_map), gap, _overlay(photo, challenger_map)]))
        )
        spent += len(strip)
        if spent > GALLERY_BUDGET_BYTES and items:
            break
        truth, counts = int(challenger.truth[i]), (int(champion_count), int(challenger.predicted[i]))
        items.append(GalleryItem(challenger.files[i], truth, *counts, champion_map, challenger_map, strip))
    return tuple(items)


def build_model_card(
    challenger_dir: Path,
    test_channel: Path,
    lineage: ModelVersion,
    champion_dir: Path | None = None,
    *,
    champion_name: str = "champion",
    storage: Storage | None = None,
    confidence: float = 0.95,
    margin: float = 0.0,
    gallery_size: int = GALLERY_SIZE,
    thumbnail_px: int = THUMBNAIL_PX,
) -> ModelCard:
    """The card of the version ``lineage`` (its model in ``challenger_dir``), scored on the local test channel
    ``test_channel`` (``<count>/<id>.jpg``), against the champion in ``champion_dir`` when there is one.

    ``storage`` reads the version's split manifest for the class balance of every side (without it, the test
    channel's); ``confidence`` and ``margin`` are :func:`bincount.stats.compare_paired`'s; the gallery shows up to
    ``gallery_size`` photos (``thumbnail_px`` square) the models count differently (:func:`_gallery_order`).

    Raises:
        ModelCardError: the champion predicts other counts than the challenger (another ``classes``).
    """
    classes = [int(c) for c in read_model_info(challenger_dir)["classes"]]
    if champion_dir is not None and (theirs := [int(c) for c in read_model_info(champion_dir)["classes"]]) != classes:
        raise ModelCardError(
            f"the champion predicts the counts {theirs} and the challenger {classes}: a card compares models of the "
            "same counts, image by image"
        )
    challenger = _score(challenger_dir, test_channel)
    truth = challenger.truth
    # the same classes: both read the same files of the channel, in the same order
    champion = _score(champion_dir, test_channel) if champion_dir is not None else None
    spec = lineage.spec
    card_lineage = Lineage(
        version=str(lineage.ref),
        model_uri=spec.model_uri,
        model_sha256=spec.model_sha256,
        split_uri=spec.dataset.split_uri,
        split_sha256=spec.dataset.split_sha256,
        code_hash=spec.code_hash,
        training_job=spec.training_job,
        flow_run_id=spec.flow_run_id,
        flow_run_url=spec.flow_run_url,
        created_at=lineage.created_at,
    )
    data = DataSummary(dict(spec.dataset.counts), _class_balance(storage, spec.dataset.split_uri, truth), len(truth))
    info = challenger.served.info
    network = {key: info[key] for key in ("arch", "image_size", "head", "decoding", "classes")}
    recipe = {"hyperparameters": dict(spec.hyperparameters), "pipeline": dict(spec.recipe), "network": network}
    challenger_scores = _model_scores(
        str(lineage.ref), challenger.served.serving["path"], truth, challenger.predicted, classes, confidence
    )
    calibration = {"challenger": reliability(challenger.confidence, challenger.predicted == truth)}
    champion_scores = comparison = confusion_change = None
    per_class_delta: dict[str, float] = {}
    gallery: tuple[GalleryItem, ...] = ()
    disagreements = 0
    if champion is not None:
        champion_scores = _model_scores(
            champion_name, champion.served.serving["path"], truth, champion.predicted, classes, confidence
        )
        calibration["champion"] = reliability(champion.confidence, champion.predicted == truth)
        comparison = compare_paired(truth, champion.predicted, challenger.predicted, confidence, margin=margin)
        per_class_delta = {
            c: challenger_scores.per_class_accuracy[c] - champion_scores.per_class_accuracy[c]
            for c in challenger_scores.per_class_accuracy
        }
        confusion_change = (np.asarray(challenger_scores.confusion) - np.asarray(champion_scores.confusion)).tolist()
        differ = np.flatnonzero(champion.predicted != challenger.predicted)
        disagreements = len(differ)
        chosen = differ[
            _gallery_order(champion.predicted[differ] == truth[differ], challenger.predicted[differ] == truth[differ])
        ]
        gallery = _gallery(test_channel, challenger, champion, chosen[:gallery_size], thumbnail_px)
    card = ModelCard(
        lineage=card_lineage,
        data=data,
        recipe=recipe,
        classes=list(classes),
        challenger=challenger_scores,
        champion=champion_scores,
        comparison=comparison,
        per_class_delta=per_class_delta,
        confusion_change=confusion_change,
        calibration=calibration,
        parity=info.get("optimized", {}).get("parity"),
        disagreements=disagreements,
        gallery=gallery,
    )
    return replace(card, markdown=render_markdown(card))


def write_model_card(storage: Storage, uri: str, card: ModelCard) -> str:
    """Store ``card`` under the folder ``uri`` (a version's folder): ``card.md`` (the page) and ``card.json``
    (the record without the page); return the page's URI."""
    page = join_uri(uri, CARD_FILE)
    storage.write_bytes(join_uri(uri, RECORD_FILE), json.dumps(card.to_dict(), indent=1).encode())
    storage.write_bytes(page, card.markdown.encode())
    return page


# --- the page -------------------------------------------------------------------------------------------------


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def _photo_png(pixels: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as a PNG of at most 128 colours (a fraction of a full-colour PNG's bytes)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).quantize(colors=128).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _overlay(photo: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """The map (any size) stretched over the photo (S, S, 3) as a jet heat map at 45%."""
    size = photo.shape[:2]
    stretched = nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(saliency, dtype=np.float32))[None, None], size=size, mode="bilinear"
    )[0, 0].numpy()
    heat = matplotlib.colormaps["jet"](stretched)[..., :3] * 255
    return (0.55 * photo + 0.45 * heat).astype(np.uint8)


def reliability_png(calibration: dict[str, Calibration]) -> bytes:
    """Accuracy against predicted-class confidence per bin for each model, the diagonal being perfect calibration."""
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfectly calibrated")
    for (role, curve), colour in zip(calibration.items(), ("tab:blue", "tab:orange"), strict=False):
        x = [b.confidence for b in curve.bins]
        axes.plot(x, [b.accuracy for b in curve.bins], marker="o", color=colour, label=f"{role} (ECE {curve.ece:.3f})")
        axes.scatter(x, [b.accuracy for b in curve.bins], s=[8 + b.images for b in curve.bins], color=colour, alpha=0.3)
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted-class probability", ylabel="accuracy")
    axes.set_title("Reliability (marker area: images per bin)")
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(alpha=0.3)
    return _figure_png(figure)


def confusion_png(card: ModelCard) -> bytes:
    """Each model's confusion matrix and, with a champion, the change (challenger minus champion)."""
    panels: list[tuple[str, list[list[int]], str]] = [(f"{card.challenger.name}", card.challenger.confusion, "Blues")]
    if card.champion is not None and card.confusion_change is not None:
        panels = [(card.champion.name, card.champion.confusion, "Blues"), *panels]
        panels.append(("change (challenger - champion)", card.confusion_change, "RdBu"))
    figure, axes_row = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    labels = [str(c) for c in card.classes]
    for axes, (title, matrix, colours) in zip(axes_row[0], panels, strict=True):
        values = np.asarray(matrix)
        reach = max(1, int(np.abs(values).max()))
        axes.imshow(values, cmap=colours, vmin=-reach if colours == "RdBu" else 0, vmax=reach)
        axes.set_xticks(range(len(labels)), labels)
        axes.set_yticks(range(len(labels)), labels)
        axes.set(xlabel="predicted count", ylabel="true count", title=title)
        for (i, j), value in np.ndenumerate(values):
            text = f"{value:+d}" if colours == "RdBu" and value else str(value)
            axes.text(j, i, text, ha="center", va="center", fontsize=8)
    return _figure_png(figure)


def _percent(interval: Interval) -> str:
    return f"{100 * interval.estimate:.1f}% [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def _counts(interval: Interval) -> str:
    return f"{interval.estimate:.2f} [{interval.low:.2f}, {interval.high:.2f}]"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _gallery_lines(card: ModelCard) -> list[str]:
    if card.champion is None:
        return ["No champion to compare with: no disagreements to show."]
    if not card.gallery:
        return [f"The models count every one of the {card.data.test_images} test images alike."]
    lines = [
        f"{len(card.gallery)} of the {card.disagreements} test images the models count differently (in turn: one "
        "only the challenger gets right, one only the champion; then ones both miss). Each: the photo | the "
        "champion's Grad-CAM | the challenger's Grad-CAM, on each model's last convolutional block for the count it "
        "predicts (red: where its evidence for that count lies).",
    ]
    for item in card.gallery:
        right = {item.champion: "the champion", item.challenger: "the challenger"}.get(item.truth, "neither")
        lines += [
            "",
            f"**`{item.file}`**: true count {item.truth}; champion {item.champion}, challenger {item.challenger} "
            f"({right} right)",
            "",
            f"![{item.file}: photo, champion's and challenger's Grad-CAM]({item.strip})",
        ]
    return lines


def render_markdown(card: ModelCard) -> str:
    """The card's page: every section in order, plots and photos inline as PNG data URIs."""
    lineage, challenger, champion = card.lineage, card.challenger, card.champion
    verdict = card.comparison.sentence if card.comparison is not None else "no champion: the figures stand alone"
    lines = [
        f"# Model card: {lineage.version}",
        "",
        f"**Against {champion.name if champion else 'no champion'}**: {verdict}",
        "",
    ]
    lines += ["## Lineage", ""]
    lines += _table(
        ["field", "value"],
        [
            ["model", f"`{lineage.model_uri}`"],
            ["model sha256", f"`{lineage.model_sha256}`"],
            ["dataset split", f"`{lineage.split_uri}`"],
            ["split sha256", f"`{lineage.split_sha256}`"],
            ["code hash", f"`{lineage.code_hash}`"],
            ["training job", f"`{lineage.training_job}`"],
            ["flow run", lineage.flow_run_url or lineage.flow_run_id or "-"],
            ["registered", lineage.created_at],
        ],
    )
    sides = [side for side in SPLITS if side in card.data.class_balance]
    lines += ["", "## Data", "", "Images per side: " + ", ".join(f"{k} {v}" for k, v in card.data.sides.items()), ""]
    lines += _table(
        ["count", *sides],
        [[c, *(card.data.class_balance[side].get(str(c), 0) for side in sides)] for c in card.classes],
    )
    lines += ["", "## Recipe", ""]
    recipe_rows = [[f"model_info.json `{k}`", f"`{v}`"] for k, v in card.recipe["network"].items()]
    recipe_rows += [[f"train.py `--{k}`", f"`{v}`"] for k, v in card.recipe["hyperparameters"].items()]
    recipe_rows += [[f"pipeline `{k}`", f"`{json.dumps(v)}`"] for k, v in card.recipe["pipeline"].items()]
    lines += _table(["setting", "value"], recipe_rows)
    lines += ["", f"## Metrics on {card.data.test_images} test images", ""]
    header = ["metric", f"challenger {challenger.name}"]
    metric_rows = [
        ["accuracy", _percent(challenger.accuracy)],
        ["RMSE (counts)", _counts(challenger.rmse)],
        ["within one", _percent(challenger.within_one)],
    ]
    if champion is not None and card.comparison is not None:
        diff = card.comparison.differences
        header += [f"champion {champion.name}", "change (paired)"]
        for row, own, change in zip(
            metric_rows,
            (_percent(champion.accuracy), _counts(champion.rmse), _percent(champion.within_one)),
            (diff.accuracy.points(), diff.rmse.counts(), diff.within_one.points()),
            strict=True,
        ):
            row += [own, change]
    lines += _table(header, metric_rows)
    confidence = card.comparison.confidence if card.comparison else 0.95
    served = f"challenger {challenger.serving}" + (f", champion {champion.serving}" if champion else "")
    lines += [
        "",
        f"Each model scored as it serves ({served}). Intervals: {100 * confidence:.0f}% percentile bootstrap over "
        "the test images; the change is the challenger's figure minus the champion's on the same images.",
    ]
    if card.comparison is not None:
        test = card.comparison.mcnemar
        lines += [
            f"Paired test: {card.comparison.test}; {test.only_b} images only the challenger gets right, "
            f"{test.only_a} only the champion, p = {test.p_value:.3g}.",
            "",
            "## Per count",
            "",
        ]
        lines += _table(
            ["count", "test images", "champion", "challenger", "change"],
            [
                [
                    c,
                    sum(challenger.confusion[i]),
                    f"{100 * champion.per_class_accuracy[str(c)]:.1f}%",
                    f"{100 * challenger.per_class_accuracy[str(c)]:.1f}%",
                    f"{100 * card.per_class_delta[str(c)]:+.1f} points",
                ]
                for i, c in enumerate(card.classes)
            ],
        )
    lines += ["", "## Confusion matrices", "", f"![confusion matrices]({_data_uri(confusion_png(card))})"]
    if card.confusion_change is not None:
        lines += ["", "Change, challenger minus champion (rows: true count, columns: predicted):", ""]
        lines += _table(
            ["true \\ predicted", *map(str, card.classes)],
            [[c, *(f"{v:+d}" for v in row)] for c, row in zip(card.classes, card.confusion_change, strict=True)],
        )
    lines += ["", "## Calibration", "", f"![reliability plot]({_data_uri(reliability_png(card.calibration))})", ""]
    lines += [
        f"Expected calibration error ({RELIABILITY_BINS} bins of predicted-class probability): "
        + ", ".join(f"{role} {curve.ece:.3f}" for role, curve in card.calibration.items())
        + "."
    ]
    lines += ["", "## int8 parity", ""]
    if card.parity is None:
        lines += ["The model has no optimized form: its eager network serves."]
    else:
        lines += [str(card.parity.get("reason", "parity record without a reason")), ""]
        scalars = [[k, v] for k, v in card.parity.items() if k != "reason" and isinstance(v, int | float | bool | str)]
        lines += _table(["figure", "value"], scalars)
    lines += ["", "## Where they disagree", "", *_gallery_lines(card), ""]
    return "\n".join(lines)
