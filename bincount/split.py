"""Stratified, seeded train/valid/test split, kept as a split manifest (id, label, split, uri, sha256)."""

from __future__ import annotations

import io

import pandas as pd
from sklearn.model_selection import train_test_split

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


def split_dataset(
    manifest: Manifest,
    downloaded: dict[str, DownloadedImage],
    source_uri: str,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pd.DataFrame:
    """Split the downloaded images of ``manifest``, stratified by count; no id lands on two sides.

    Images the download could not fetch are left out (the download report lists them).
    """
    check_fractions(fractions)
    rows = pd.DataFrame(
        [
            {"id": image_id, "label": label, "uri": image_uri(source_uri, image_id), "sha256": downloaded[image_id].sha256}
            for image_id, label in manifest.items()
            if image_id in downloaded
        ],
        columns=["id", "label", "uri", "sha256"],
    )
    train_share, valid_share, test_share = fractions
    try:
        train, rest = train_test_split(rows, train_size=train_share, stratify=rows["label"], random_state=seed)
        valid, test = train_test_split(
            rest, train_size=valid_share / (valid_share + test_share), stratify=rest["label"], random_state=seed
        )
    except ValueError as error:
        counts = rows["label"].value_counts().sort_index().to_dict()
        raise SplitError(
            f"cannot split {len(rows)} images with counts per class {counts} into {fractions}: {error}. "
            "Every class needs a few images on each side: add images or change the fractions."
        ) from None
    parts = [part.assign(split=name) for part, name in zip((train, valid, test), SPLITS)]
    table = pd.concat(parts)[COLUMNS]
    table["split"] = pd.Categorical(table["split"], categories=SPLITS, ordered=True)
    return table.sort_values(["split", "label", "id"]).reset_index(drop=True)


def write_split(table: pd.DataFrame, storage: Storage, uri: str) -> None:
    storage.write_bytes(uri, table.to_csv(index=False).encode())


def read_split(storage: Storage, uri: str) -> pd.DataFrame:
    table = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype={"id": str, "label": int, "split": str, "uri": str, "sha256": str})
    missing = set(COLUMNS) - set(table.columns)
    if missing:
        raise SplitError(f"{uri} is not a split manifest: it lacks columns {sorted(missing)}")
    return table
