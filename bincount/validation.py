"""Data validation before training: checks over a split table and the local mirror, with a gate.

    decodes         every image decodes whole (a truncated or foreign file fails)
    size-channels   each side within [min_side, max_side] px, RGB or greyscale, pixels not one flat value
    duplicates      no photo (same sha256) on two sides: it would leak test answers into training
    labels          every label is a count the model predicts (1-5)
    class-balance   each count holds at least ``min_class_share`` of the training side
    shift           class shares and brightness against the previous accepted version of this dataset (its
                    originals: photos harvested from production are left out, their shift is their point)

Plain pandas and scipy: the checks are few and each must name the images it fails on; Great
Expectations, whylogs and Evidently resolve with the pinned stack but are not in the lock, add
dozens of packages (Evidently pulls litestar, nltk, plotly, pyarrow) and would wrap the same tests.
The statistics of an accepted dataset are kept at ``<dataset>/validation.json`` for the next run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from bincount.download import image_path
from bincount.ids import is_production_photo
from bincount.manifest import CLASSES

VALIDATION_SCHEMA = 1
_LISTED = 10  # images named per failed check in the message (all of them are in the report)


class DataValidationError(ValueError):
    """The dataset failed a check; the message names the check and the images."""


class ValidationThresholds(BaseModel):
    """When the data stage stops the pipeline (flow parameters: ``data.validation``)."""

    model_config = ConfigDict(frozen=True)

    min_side: int = Field(default=32, ge=1, description="Smallest image side accepted, px.")
    max_side: int = Field(default=10_000, ge=1, description="Largest image side accepted, px.")
    min_class_share: float = Field(
        default=0.02, ge=0, le=1, description="Least share of the training side each count must hold."
    )
    max_class_shift: float = Field(
        default=0.15,
        ge=0,
        le=1,
        description="Largest change of a count's share of the training side since the last accepted version.",
    )
    max_brightness_ks: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="Largest KS distance of image brightness since the last accepted version (with p < 0.01).",
    )
    sample: int = Field(default=500, ge=10, description="Images whose brightness is kept and compared.")


@dataclass
class CheckResult:
    check: str
    passed: bool
    message: str
    images: list[str] = field(default_factory=list)


@dataclass
class ValidationReport:
    checks: list[CheckResult]
    statistics: dict[str, Any]  # class shares of the training side and the brightness sample

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failure_message(self) -> str:
        parts = []
        for check in self.checks:
            if not check.passed:
                named = ", ".join(check.images[:_LISTED]) + (
                    f" and {len(check.images) - _LISTED} more" if len(check.images) > _LISTED else ""
                )
                parts.append(f"{check.check}: {check.message}" + (f" (images: {named})" if named else ""))
        return "data validation failed, so nothing was trained: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": VALIDATION_SCHEMA,
            "checks": [asdict(check) for check in self.checks],
            "statistics": self.statistics,
        }


def _inspect(path: Path) -> tuple[tuple[int, int], str, float, bool]:
    """(size, mode, brightness, flat) of one image, decoded whole; raises OSError/ValueError when it does not decode."""
    with Image.open(path) as image:
        size, mode = image.size, image.mode
        image.draft("L", (128, 128))  # a reduced decode still reads every byte of the file
        grey = np.asarray(image.convert("L"), dtype=np.float32)
    return size, mode, float(grey.mean()), float(grey.max() - grey.min()) < 2.0


def class_shares(table: pd.DataFrame) -> dict[str, float]:
    """Each count's share of ``table``'s labels (0 for all on an empty table)."""
    return {str(c): float((table["label"] == c).mean()) if len(table) else 0.0 for c in CLASSES}


def validate_dataset(
    split_table: pd.DataFrame,
    local_dir: Path,
    previous: dict[str, Any] | None,
    thresholds: ValidationThresholds,
    seed: int = 0,
) -> ValidationReport:
    """Run every check over ``split_table`` (id, label, split, sha256) with images in the mirror at ``local_dir``.

    One image is decoded at a time, and only the sampled images' brightness is kept, so memory grows with the
    table (and the failures listed), not with the images.
    """
    ids = split_table["id"].tolist()
    originals = [image_id for image_id in ids if not is_production_photo(image_id)]
    rng = np.random.default_rng(seed)
    size = min(thresholds.sample, len(originals))
    sampled = set(rng.choice(originals, size=size, replace=False).tolist() if originals else [])
    unreadable, bad_size, flat, brightness = [], [], [], {}
    for image_id in ids:
        try:
            (width, height), mode, mean, is_flat = _inspect(image_path(local_dir, image_id))
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            unreadable.append(f"{image_id} ({type(error).__name__})")
            continue
        if image_id in sampled:
            brightness[image_id] = mean
        if not (
            thresholds.min_side <= min(width, height) and max(width, height) <= thresholds.max_side
        ) or mode not in ("RGB", "L"):
            bad_size.append(f"{image_id} ({width}x{height} {mode})")
        if is_flat:
            flat.append(image_id)
    checks = [
        CheckResult(
            "decodes",
            not unreadable,
            f"{len(unreadable)} images do not decode" if unreadable else "every image decodes",
            unreadable,
        ),
        CheckResult(
            "size-channels",
            not (bad_size or flat),
            f"{len(bad_size)} images outside {thresholds.min_side}-{thresholds.max_side} px or not RGB/greyscale, "
            f"{len(flat)} of one flat colour"
            if bad_size or flat
            else "sizes and channels in range",
            bad_size + flat,
        ),
    ]
    sides = split_table.groupby("sha256")["split"].nunique()
    leaked = split_table[split_table["sha256"].isin(sides[sides > 1].index)].sort_values(["sha256", "split"])
    duplicated = [f"{row.id} ({row.split})" for row in leaked.itertuples()]
    checks.append(
        CheckResult(
            "duplicates",
            not duplicated,
            f"{leaked['sha256'].nunique()} photos are on more than one side (same content, different ids)"
            if duplicated
            else "no photo on two sides",
            duplicated,
        )
    )
    bad_labels = [f"{row.id} (label {row.label})" for row in split_table.itertuples() if row.label not in CLASSES]
    checks.append(
        CheckResult(
            "labels",
            not bad_labels,
            f"{len(bad_labels)} labels outside 1-5" if bad_labels else "labels in 1-5",
            bad_labels,
        )
    )
    train = split_table[split_table["split"] == "train"]
    shares = class_shares(train)
    scarce = [f"count {c}: {share:.1%}" for c, share in shares.items() if share < thresholds.min_class_share]
    checks.append(
        CheckResult(
            "class-balance",
            not scarce,
            f"counts below {thresholds.min_class_share:.0%} of the training side: {', '.join(scarce)}"
            if scarce
            else "every count represented",
        )
    )
    # The shift check compares the dataset's originals: photos harvested from production are darker, or of
    # other bins, on purpose (the drift they were harvested for), so they are left out of it and its statistics.
    harvested = train["id"].map(is_production_photo)
    original_shares = class_shares(train[~harvested])
    sample = [round(brightness[image_id], 2) for image_id in sorted(brightness)]  # the sampled images that decode
    if previous:
        shift = {c: original_shares[c] - previous["class_shares"].get(c, 0.0) for c in original_shares}
        moved = [
            f"count {c}: {previous['class_shares'].get(c, 0.0):.1%} -> {original_shares[c]:.1%}"
            for c, d in shift.items()
            if abs(d) > thresholds.max_class_shift
        ]
        ks = stats.ks_2samp(previous["brightness"], sample) if sample and previous.get("brightness") else None
        darker = ks is not None and ks.statistic > thresholds.max_brightness_ks and ks.pvalue < 0.01
        problems = moved + (
            [f"brightness KS {ks.statistic:.2f} (mean {np.mean(previous['brightness']):.0f} -> {np.mean(sample):.0f})"]
            if darker
            else []
        )
        exempt = (
            f" ({int(harvested.sum())} training photos harvested from production left out: their shift is their point)"
            if harvested.any()
            else ""
        )
        checks.append(
            CheckResult(
                "shift",
                not problems,
                "against the previous version: "
                + ("; ".join(problems) if problems else "no shift past the thresholds")
                + exempt,
            )
        )
    else:
        checks.append(CheckResult("shift", True, "no previous version of this dataset to compare with"))
    return ValidationReport(checks, {"class_shares": original_shares, "brightness": sample})


def previous_statistics(document: bytes | None) -> dict[str, Any] | None:
    """The statistics of the last accepted version (None: none, or written by another schema)."""
    if document is None:
        return None
    data = json.loads(document)
    return data.get("statistics") if data.get("schema") == VALIDATION_SCHEMA else None
