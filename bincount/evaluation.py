"""Score a model (``model.tar.gz`` or a folder, any URI) on a test channel: accuracy, RMSE of the
count, per-class accuracy, within-one accuracy and the confusion matrix (scikit-learn's), and its answer on
each image (what a paired comparison of two models on the same images needs)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, mean_squared_error, recall_score

from bincount.contracts.registry import ImagePredictions
from bincount.models import fetch_model
from bincount.storage import Storage
from sm_scripts.data import ImageCache, batches, load_channel
from sm_scripts.inference import model_fn
from sm_scripts.model_dir import read_model_info
from sm_scripts.networks import predict_classes
from sm_scripts.preprocessing import channel_values


@dataclass
class Evaluation:
    """Scores on ``images`` test images; ``confusion[i][j]`` counts true ``classes[i]`` predicted ``classes[j]``.

    ``predictions`` is the answer on each image (set by :func:`evaluate_model`; None for scores made without
    the images' names).
    """

    images: int
    accuracy: float
    rmse: float
    within_one_accuracy: float
    per_class_accuracy: dict[str, float]
    classes: list[int]
    confusion: list[list[int]]
    predictions: ImagePredictions | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_counts(true_counts: list[int], predicted_counts: list[int], classes: list[int]) -> Evaluation:
    """The scores of predicted counts against true ones."""
    if not true_counts or len(true_counts) != len(predicted_counts):
        raise ValueError(
            f"need as many predictions as labels, at least one ({len(predicted_counts)} vs {len(true_counts)})"
        )
    truth, predicted = np.asarray(true_counts), np.asarray(predicted_counts)
    recalls = recall_score(truth, predicted, labels=classes, average=None, zero_division=0.0)
    return Evaluation(
        images=len(truth),
        accuracy=float(accuracy_score(truth, predicted)),
        rmse=math.sqrt(float(mean_squared_error(truth, predicted))),
        within_one_accuracy=float(np.mean(np.abs(truth - predicted) <= 1)),
        per_class_accuracy={str(c): float(r) for c, r in zip(classes, recalls, strict=True)},
        classes=list(classes),
        confusion=confusion_matrix(truth, predicted, labels=classes).tolist(),
    )


def predict_counts(model_dir: Path, cache: ImageCache, batch_size: int = 64) -> list[int]:
    """The count predicted for each cached image by the model in ``model_dir`` as it serves: its optimized (int8)
    form where it has one that loads here, its eager network otherwise (``inference.model_fn`` decides, as on
    an endpoint)."""
    served = model_fn(str(model_dir))
    info = served.info
    mean, std = channel_values(info["mean"]), channel_values(info["std"])
    predicted: list[int] = []
    with torch.inference_mode():
        for images, _ in batches(cache, batch_size, torch.device("cpu"), mean, std, shuffle=False):
            if served.optimized is not None:
                scores = torch.from_numpy(served.optimized(images.contiguous().numpy()))
            else:
                scores = served.network(images.to(served.device, memory_format=torch.channels_last)).float()
            predicted += [info["classes"][i] for i in predict_classes(scores, info["decoding"]).tolist()]
    return predicted


def evaluate_model(storage: Storage, model_uri: str, test_channel_uri: str) -> Evaluation:
    """Score the model at ``model_uri`` (an archive or a folder) on the channel at ``test_channel_uri``, keeping its
    answer on each image (named by its path in the channel, ``<count>/<file>``)."""
    with tempfile.TemporaryDirectory(prefix="evaluate-") as scratch:
        model_dir, _ = fetch_model(storage, model_uri, Path(scratch) / "models")
        info = read_model_info(model_dir)
        channel = storage.local_folder(test_channel_uri, Path(scratch) / "test")
        classes = [str(c) for c in info["classes"]]
        cache = load_channel(channel, classes, info["image_size"], threads=torch.get_num_threads())
        predicted = predict_counts(model_dir, cache)
        files = tuple(Path(file).relative_to(channel).as_posix() for file in cache.files)
    true_counts = [info["classes"][i] for i in cache.labels.tolist()]
    evaluation = score_counts(true_counts, predicted, info["classes"])
    return replace(evaluation, predictions=ImagePredictions(files, tuple(true_counts), tuple(predicted)))
