"""Leak-free train/valid/test splits, kept as a split manifest (id, label, split, uri, sha256).

An image keeps the side it was first given for the life of a dataset: :func:`split_dataset` takes
the dataset's previous split and leaves every id it holds where it was. Only new images are
placed, class by class, so that each class's totals (old and new together) stay as close to the
fractions as whole images allow: each new image goes to the side furthest below its share at that
moment. New images are taken in the order of a seeded hash of their id, so the outcome depends on
the seed and the set of images, never on the order of the manifest.

The memory is the previous ``split.csv``: an id that drops out of one split (its download failed)
and comes back later is placed as a new image.
"""

from __future__ import annotations

import hashlib
import io

import pandas as pd

from bincount.download import DownloadedImage
from bincount.manifest import Manifest, image_uri
from bincount.storage import Storage

SPLITS = ("train", "valid", "test")
COLUMNS = ["id", "label", "split", "uri", "sha256"]


class SplitError(ValueError):
    """The split cannot be made as asked; the message says how to change the request."""


def check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SplitError(f"fractions {fractions} must be three positive shares (train, valid, test) summing to 1")


def _order_key(seed: int, image_id: str) -> str:
    return hashlib.sha256(f"{seed}\x1f{image_id}".encode()).hexdigest()


def place_new(
    new_ids: list[str], existing: dict[str, int], fractions: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """Sides for the ``new_ids`` of one class, given how many of the class each side holds already.

    Each new image (in seeded-hash order) goes to the side with the largest shortfall
    ``fraction * total - count``; ties go to the earlier side (train, valid, test).
    """
    counts = [existing.get(side, 0) for side in SPLITS]
    total = sum(counts)
    sides: dict[str, str] = {}
    for image_id in sorted(new_ids, key=lambda i: _order_key(seed, i)):
        total += 1
        shortfalls = [share * total - count for share, count in zip(fractions, counts, strict=True)]
        chosen = max(range(len(SPLITS)), key=lambda k: (shortfalls[k], -k))
        counts[chosen] += 1
        sides[image_id] = SPLITS[chosen]
    return sides


def split_dataset(
    manifest: Manifest,
    downloaded: dict[str, DownloadedImage],
    source_uri: str,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    previous: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Split the downloaded images of ``manifest``, stratified by count; no id ever changes side.

    Args:
        manifest: image id -> count.
        downloaded: the images the download fetched; the others are left out (the download report lists them).
        source_uri: the bucket the images came from (their ``uri`` column).
        fractions: train, valid and test shares, per class.
        seed: orders the new images of each class; the old ones keep their side whatever the seed.
        previous: the dataset's previous split (:func:`read_split`); its ids keep their side.

    Raises:
        SplitError: the fractions are not three positive shares, or a class ends up missing from a side.
    """
    check_fractions(fractions)
    rows = pd.DataFrame(
        [
            {
                "id": image_id,
                "label": label,
                "uri": image_uri(source_uri, image_id),
                "sha256": downloaded[image_id].sha256,
            }
            for image_id, label in manifest.items()
            if image_id in downloaded
        ],
        columns=["id", "label", "uri", "sha256"],
    )
    known = {}
    if previous is not None:
        known = dict(zip(previous["id"].astype(str), previous["split"].astype(str), strict=True))
    sides = {image_id: known[image_id] for image_id in rows["id"] if image_id in known}
    for _, group in rows.groupby("label"):
        kept = pd.Series([sides[i] for i in group["id"] if i in sides], dtype=str).value_counts().to_dict()
        new_ids = [i for i in group["id"] if i not in sides]
        sides.update(place_new(new_ids, kept, fractions, seed))
    table = rows.assign(split=rows["id"].map(sides))[COLUMNS]
    per_class = table.groupby(["label", "split"]).size().unstack(fill_value=0)
    per_class = per_class.reindex(columns=list(SPLITS), fill_value=0)
    short = per_class[(per_class == 0).any(axis=1)]
    if len(short):
        counts = rows["label"].value_counts().sort_index().to_dict()
        raise SplitError(
            f"cannot split {len(rows)} images with counts per class {counts} into {fractions}: "
            f"class(es) {sorted(short.index.tolist())} would miss a side ({short.to_dict('index')}). "
            "Every class needs a few images on each side: add images or change the fractions."
        )
    table["split"] = pd.Categorical(table["split"], categories=SPLITS, ordered=True)
    return table.sort_values(["split", "label", "id"]).reset_index(drop=True)


def write_split(table: pd.DataFrame, storage: Storage, uri: str) -> None:
    storage.write_bytes(uri, table.to_csv(index=False).encode())


def read_split(storage: Storage, uri: str) -> pd.DataFrame:
    types = {"id": str, "label": int, "split": str, "uri": str, "sha256": str}
    table = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=types)
    missing = set(COLUMNS) - set(table.columns)
    if missing:
        raise SplitError(f"{uri} is not a split manifest: it lacks columns {sorted(missing)}")
    unknown = set(table["split"]) - set(SPLITS)
    if unknown:
        raise SplitError(f"{uri} has sides {sorted(unknown)}: a split manifest's sides are {SPLITS}")
    return table
