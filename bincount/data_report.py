"""The data report: class counts per split, image sizes, and the training split's per-channel
mean/std (the normalization that train.py and inference.py apply)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from bincount.download import image_path

NORMALIZATION_SIZE = 224
"""Images are resized to the training input size before their statistics are taken."""


@dataclass
class DataReport:
    class_counts: dict[str, dict[int, int]]
    """split -> count label -> number of images."""
    image_sizes: dict[str, int]
    """"<width>x<height>" -> number of images, most common first."""
    mean: list[float]
    std: list[float]
    normalization_images: int
    notes: list[str] = field(default_factory=list)


def channel_statistics(paths: list[Path], size: int = NORMALIZATION_SIZE) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel values in [0, 1], accumulated image by image (constant memory)."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    pixels = 0
    for path in paths:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG decodes at a reduced scale: much faster for large photos
            array = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0
        flat = array.reshape(-1, 3)
        total += flat.sum(axis=0)
        total_sq += (flat**2).sum(axis=0)
        pixels += flat.shape[0]
    if not pixels:
        raise ValueError("no training images to compute the normalization from")
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean**2, 0.0))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def build_data_report(
    split_table: pd.DataFrame, local_dir: Path, max_normalization_images: int = 2000, seed: int = 0
) -> DataReport:
    """Summarise the split; the normalization uses up to ``max_normalization_images`` training images."""
    counts = split_table.groupby(["split", "label"], observed=True).size()
    class_counts = {
        str(split): {int(label): int(n) for label, n in counts[split].items()}
        for split in counts.index.levels[0]
        if split in counts
    }
    sizes: Counter[str] = Counter()
    for image_id in split_table["id"]:
        with Image.open(image_path(local_dir, image_id)) as image:  # reads the header only
            sizes[f"{image.width}x{image.height}"] += 1
    train_ids = split_table.loc[split_table["split"] == "train", "id"]
    sample = train_ids.sample(n=min(max_normalization_images, len(train_ids)), random_state=seed)
    mean, std = channel_statistics([image_path(local_dir, image_id) for image_id in sample])
    notes = []
    if len(sample) < len(train_ids):
        notes.append(f"normalization from a seeded sample of {len(sample)} of {len(train_ids)} training images")
    return DataReport(
        class_counts=class_counts,
        image_sizes=dict(sizes.most_common()),
        mean=mean,
        std=std,
        normalization_images=len(sample),
        notes=notes,
    )


def class_count_rows(report: DataReport) -> list[dict[str, int | str]]:
    """One row per count label, one column per split (the table artifact)."""
    labels = sorted({label for split in report.class_counts.values() for label in split})
    return [
        {"count": label, **{split: report.class_counts[split].get(label, 0) for split in report.class_counts}}
        for label in labels
    ]
