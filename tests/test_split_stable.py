"""Splits never leak: an image keeps its first side as the dataset grows; classes stay near 80/10/10."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bincount.download import DownloadedImage
from bincount.split import SPLITS, SplitError, read_split, split_dataset, write_split
from bincount.storage import Storage

SOURCE = "s3://abid-sample"


def grown_manifests(per_class: dict[int, int], seed: int = 0) -> list[dict[str, int]]:
    """Half, three quarters, then all of each class's images (ids shuffled, so growth is not by id order)."""
    rng = np.random.default_rng(seed)
    ids = {label: [f"{label}{i:05d}" for i in rng.permutation(n)] for label, n in per_class.items()}
    return [
        {image_id: label for label, names in ids.items() for image_id in names[: int(len(names) * share)]}
        for share in (0.5, 0.75, 1.0)
    ]


def downloaded_for(manifest: dict[str, int]) -> dict[str, DownloadedImage]:
    return {i: DownloadedImage(i, "0" * 64, 1) for i in manifest}


def shares(table: pd.DataFrame) -> pd.DataFrame:
    counts = table.groupby(["label", "split"], observed=True).size().unstack(fill_value=0)[list(SPLITS)]
    return counts.div(counts.sum(axis=1), axis=0)


@pytest.mark.parametrize(
    "per_class", [{1: 1200, 2: 1800, 3: 2100, 4: 2000, 5: 1700}, {1: 40, 2: 61, 3: 77, 4: 53, 5: 29}]
)
def test_growing_dataset_never_moves_an_id_and_stays_stratified(per_class: dict[int, int]) -> None:
    sides: dict[str, str] = {}
    previous = None
    for manifest in grown_manifests(per_class):
        table = split_dataset(manifest, downloaded_for(manifest), SOURCE, seed=3, previous=previous)
        assert len(table) == len(manifest) and table["id"].is_unique
        now = dict(zip(table["id"], table["split"].astype(str), strict=True))
        assert {i: now[i] for i in sides} == sides, "an id changed side"
        sides.update(now)
        # Per class, each side is within one image (two after rounding across steps) of its share.
        counts = table.groupby(["label", "split"], observed=True).size().unstack(fill_value=0)[list(SPLITS)]
        targets = np.outer(counts.sum(axis=1), (0.8, 0.1, 0.1))
        assert np.abs(counts.to_numpy() - targets).max() <= 2, counts
        previous = table
    final = shares(previous)
    if min(per_class.values()) >= 1000:
        assert np.allclose(final.to_numpy(), [[0.8, 0.1, 0.1]] * len(per_class), atol=0.002), final


def test_old_split_files_stay_readable_and_their_sides_win(tmp_path: Path) -> None:
    storage = Storage()
    uri = (tmp_path / "split.csv").as_uri()
    # A split.csv as the earlier (sklearn) split wrote it: a side that differs from what a fresh split would pick.
    old = pd.DataFrame(
        [
            {
                "id": f"{i:05d}",
                "label": 1 + i % 5,
                "split": "test" if i < 5 else "train",
                "uri": f"{SOURCE}/bin-images/{i:05d}.jpg",
                "sha256": "0" * 64,
            }
            for i in range(50)
        ]
    )
    storage.write_bytes(uri, old.to_csv(index=False).encode())
    previous = read_split(storage, uri)
    manifest = {f"{i:05d}": 1 + i % 5 for i in range(100)}
    table = split_dataset(manifest, downloaded_for(manifest), SOURCE, previous=previous)
    kept = table.set_index("id").loc[old["id"], "split"].astype(str)
    assert (kept.to_numpy() == old["split"].to_numpy()).all()
    write_split(table, storage, uri)
    assert read_split(storage, uri)["split"].tolist() == table["split"].astype(str).tolist()


def test_seed_orders_new_images_and_manifest_order_does_not_matter() -> None:
    manifest = {f"{i:05d}": 1 + i % 5 for i in range(300)}
    reverse = dict(reversed(list(manifest.items())))
    a = split_dataset(manifest, downloaded_for(manifest), SOURCE, seed=0)
    assert a.equals(split_dataset(reverse, downloaded_for(manifest), SOURCE, seed=0))
    assert not a.equals(split_dataset(manifest, downloaded_for(manifest), SOURCE, seed=1))


def test_a_class_too_small_for_every_side_is_a_clear_error() -> None:
    manifest = {**{f"a{i}": 1 for i in range(30)}, **{f"b{i}": 2 for i in range(4)}}
    with pytest.raises(SplitError, match=r"class\(es\) \[2\] would miss a side.*add images or change the fractions"):
        split_dataset(manifest, downloaded_for(manifest), SOURCE)


def test_a_malformed_previous_split_is_refused(tmp_path: Path) -> None:
    storage = Storage()
    uri = (tmp_path / "split.csv").as_uri()
    storage.write_bytes(uri, b"id,label,split,uri,sha256\n00001,1,holdout,s3://x/1.jpg,00\n")
    with pytest.raises(SplitError, match="sides"):
        read_split(storage, uri)
