"""Leak-free train/valid/test splits: a placement record for the life of a dataset, and one run's view.

An image keeps the side it was first given for the life of a dataset. Every id ever placed is in
the dataset's placement record, an append-only series of batches, one object each, written once
(create-if-absent) and read as their union::

    {dataset}/placements/000001.csv, 000002.csv, ...     columns: id, label, split
    {dataset}/split.csv                                   this run's view: id, label, split, uri, sha256

:func:`split_dataset` leaves every id of the record where it was; only new images are placed,
class by class, so that each class's totals in the record (old and new together) stay as close
to the fractions as whole images allow: each new image goes to the side furthest below its share
at that moment. New images are taken in the order of a seeded hash of their id, so the outcome
depends on the seed, the record and the set of images, never on the order of the manifest.

A run over a subset (an ids file, a manifest that shrank) neither changes nor forgets a side: the
ids it leaves out stay in the record, and come back on their side when a later run lists them.
:func:`record_split` decides the new sides against the whole record and appends them as the next
batch; when a concurrent run took that batch number first, it reads the record again and decides
again, so no id is ever placed twice. A dataset written before the record existed (``split.csv``
only) is read as if its ``split.csv`` were the first batch, and written so with the next new batch.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from bincount.download import DownloadedImage
from bincount.manifest import Manifest, image_uri
from bincount.storage import ObjectNotFoundError, Storage, TransientStorageError, join_uri

SPLITS = ("train", "valid", "test")
COLUMNS = ["id", "label", "split", "uri", "sha256"]
PLACEMENT_COLUMNS = ["id", "label", "split"]
SPLIT_FILE = "split.csv"
PLACEMENTS = "placements"
MAX_RECORD_ATTEMPTS = 50
_BATCH_FILE = re.compile(r"(\d{6,})\.csv")


class SplitError(ValueError):
    """The split cannot be made as asked; the message says how to change the request."""


@dataclass
class PlacementRecord:
    """Every id ever placed in a dataset (``table``: id, label, split; the first placement of an id wins).

    ``batches``: how many batch objects it was read from (the next batch is number ``batches + 1``);
    ``legacy``: read from a ``split.csv`` written before the record existed (no batch yet).
    """

    table: pd.DataFrame
    batches: int = 0
    legacy: bool = False


@dataclass
class SplitView:
    """What one run's split did: its view (as written to ``split.csv``) and how it relates to the record."""

    table: pd.DataFrame
    kept: int  # ids of this run already in the record: on their recorded side
    placed: int  # ids of this run placed now (appended to the record)
    remembered: int  # ids in the record (after this run), this run's or not
    changed: bool  # split.csv holds a different view than before this run

    def summary(self, dataset_uri: str, seed: int) -> str:
        """One line saying what the split did: the sizes of the sides, what kept its side and what was placed."""
        sizes = {side: int(n) for side, n in self.table["split"].value_counts().reindex(list(SPLITS)).items()}
        return (
            f"Split {len(self.table)} images {sizes} (seed {seed}) under {dataset_uri}: {self.kept} kept their "
            f"recorded side, {self.placed} placed anew; the record holds {self.remembered} ids "
            f"({self.remembered - len(self.table)} not in this run, kept for when they come back)"
        )


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
        previous: every id placed before (id, label, split: the dataset's :class:`PlacementRecord` table, or
            a split manifest); its ids keep their side, and its per-class counts are what new images balance.

    Raises:
        SplitError: the fractions are not three positive shares, or a class ends up missing from a side.
    """
    check_fractions(fractions)
    ids = [image_id for image_id in manifest if image_id in downloaded]  # columns, not a dict a row: the table's size
    rows = pd.DataFrame(
        {
            "id": pd.Series(ids, dtype=object),
            "label": pd.Series([manifest[image_id] for image_id in ids], dtype="int64"),
            "uri": pd.Series([image_uri(source_uri, image_id) for image_id in ids], dtype=object),
            "sha256": pd.Series([downloaded[image_id].sha256 for image_id in ids], dtype=object),
        }
    )
    if previous is None:
        previous = pd.DataFrame(columns=PLACEMENT_COLUMNS)
    known = dict(zip(previous["id"].astype(str), previous["split"].astype(str), strict=True))
    recorded = Counter(zip(previous["label"].astype(int), previous["split"].astype(str), strict=True))
    sides = {image_id: known[image_id] for image_id in rows["id"] if image_id in known}
    for label, group in rows.groupby("label"):
        new_ids = [i for i in group["id"] if i not in sides]
        sides.update(place_new(new_ids, {side: recorded[label, side] for side in SPLITS}, fractions, seed))
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


def _read_table(data: bytes, uri: str, columns: list[str]) -> pd.DataFrame:
    types = {"id": str, "label": int, "split": str, "uri": str, "sha256": str}
    table = pd.read_csv(io.BytesIO(data), dtype={column: types[column] for column in columns})
    missing = set(columns) - set(table.columns)
    if missing:
        raise SplitError(f"{uri} is not a split manifest: it lacks columns {sorted(missing)}")
    unknown = set(table["split"]) - set(SPLITS)
    if unknown:
        raise SplitError(f"{uri} has sides {sorted(unknown)}: a split manifest's sides are {SPLITS}")
    return table


def read_split(storage: Storage, uri: str) -> pd.DataFrame:
    return _read_table(storage.read_bytes(uri), uri, COLUMNS)


def batch_uri(dataset_uri: str, number: int) -> str:
    return join_uri(dataset_uri, PLACEMENTS, f"{number:06d}.csv")


def read_placements(storage: Storage, dataset_uri: str) -> PlacementRecord:
    """The dataset's placement record: the union of its batches (in order; an id's first placement wins).

    A dataset without batches but with a ``split.csv`` (written before the record existed) is read as
    that split, ``legacy``; a new dataset as an empty record.
    """
    prefix = join_uri(dataset_uri, PLACEMENTS)
    numbered = {}
    for info in storage.list(prefix):
        match = _BATCH_FILE.fullmatch(info.uri.rsplit("/", 1)[-1])
        if match:
            numbered[int(match[1])] = info.uri
    if numbered:
        batches = [_read_table(storage.read_bytes(uri), uri, PLACEMENT_COLUMNS) for _, uri in sorted(numbered.items())]
        table = pd.concat([batch[PLACEMENT_COLUMNS] for batch in batches], ignore_index=True)
        return PlacementRecord(table.drop_duplicates("id", keep="first").reset_index(drop=True), max(numbered))
    try:
        legacy = read_split(storage, join_uri(dataset_uri, SPLIT_FILE))
    except ObjectNotFoundError:
        return PlacementRecord(pd.DataFrame({"id": [], "label": [], "split": []}).astype({"id": str, "label": int}))
    return PlacementRecord(legacy[PLACEMENT_COLUMNS].copy(), 0, legacy=True)


def record_split(
    storage: Storage,
    dataset_uri: str,
    manifest: Manifest,
    downloaded: dict[str, DownloadedImage],
    source_uri: str,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> SplitView:
    """Split against the dataset's placement record, append the new placements to it, write ``split.csv``.

    The new ids' sides are decided against the whole record and appended as its next batch (created only
    if absent); if another run appended that batch first, the record is read again and the sides decided
    again. Then this run's view is written to ``split.csv``, every run, whatever it placed.

    Raises:
        SplitError: as :func:`split_dataset` (nothing is recorded or written then).
        TransientStorageError: other runs kept appending to the record for :data:`MAX_RECORD_ATTEMPTS` tries.
    """
    for _ in range(MAX_RECORD_ATTEMPTS):
        record = read_placements(storage, dataset_uri)
        table = split_dataset(manifest, downloaded, source_uri, fractions, seed, previous=record.table)
        is_new = ~table["id"].isin(record.table["id"])
        placed_now = table.loc[is_new, PLACEMENT_COLUMNS].astype({"split": str})
        batch = pd.concat([record.table, placed_now], ignore_index=True) if record.legacy else placed_now
        if batch.empty or storage.create_new(
            batch_uri(dataset_uri, record.batches + 1), batch.to_csv(index=False).encode()
        ):
            break
    else:
        raise TransientStorageError(
            f"other runs kept adding placements to {join_uri(dataset_uri, PLACEMENTS)} "
            f"({MAX_RECORD_ATTEMPTS} tries): run the split again once they finished"
        )
    split_uri = join_uri(dataset_uri, SPLIT_FILE)
    view = table.to_csv(index=False).encode()
    try:
        changed = storage.read_bytes(split_uri) != view
    except ObjectNotFoundError:
        changed = True
    storage.write_bytes(split_uri, view)
    placed = int(is_new.sum())
    return SplitView(
        table=table,
        kept=len(table) - placed,
        placed=placed,
        remembered=len(record.table) + placed,
        changed=changed,
    )
