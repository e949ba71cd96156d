"""Splits never leak: an image keeps its first side as the dataset grows; classes stay near 80/10/10."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bincount.download import DownloadedImage
from bincount.split import (
    SPLITS,
    SplitError,
    batch_uri,
    read_placements,
    read_split,
    record_split,
    split_dataset,
    write_split,
)
from bincount.storage import Storage, join_uri

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


def sides_of(table: pd.DataFrame) -> dict[str, str]:
    return dict(zip(table["id"].astype(str), table["split"].astype(str), strict=True))


def test_a_subset_run_then_the_full_manifest_again_moves_no_id(tmp_path: Path) -> None:
    """The issue's reproduction: 1,000 ids, then an ids file of 400 of them and 100 new ones, then all again."""
    storage = Storage()
    dataset = (tmp_path / "datasets" / "abid").as_uri()
    rng = np.random.default_rng(0)
    full = {f"{i:05d}": int(rng.integers(1, 6)) for i in range(1000)}
    first = record_split(storage, dataset, full, downloaded_for(full), SOURCE, seed=0)
    assert (first.kept, first.placed, first.remembered) == (0, 1000, 1000)
    recorded = sides_of(first.table)

    subset = {i: label for i, label in full.items() if rng.random() < 0.4}
    grown = {f"n{i:04d}": int(rng.integers(1, 6)) for i in range(100)}
    smaller = record_split(storage, dataset, subset | grown, downloaded_for(subset | grown), SOURCE, seed=0)
    assert (smaller.kept, smaller.placed, smaller.remembered) == (len(subset), 100, 1100)
    sizes = smaller.table["split"].value_counts()
    assert smaller.summary(dataset, 0) == (
        f"Split {len(subset) + 100} images {{'train': {sizes['train']}, 'valid': {sizes['valid']}, "
        f"'test': {sizes['test']}}} (seed 0) under {dataset}: {len(subset)} kept their recorded side, 100 placed "
        f"anew; the record holds 1100 ids ({1000 - len(subset)} not in this run, kept for when they come back)"
    )
    assert {i: sides_of(smaller.table)[i] for i in subset} == {i: recorded[i] for i in subset}
    assert read_split(storage, join_uri(dataset, "split.csv"))["id"].tolist() == smaller.table["id"].tolist()
    recorded |= sides_of(smaller.table)

    again = record_split(storage, dataset, full | grown, downloaded_for(full | grown), SOURCE, seed=0)
    assert (again.kept, again.placed) == (1100, 0)
    moved = {i for i, side in sides_of(again.table).items() if recorded[i] != side}
    assert not moved, f"{len(moved)} ids changed side"
    assert sides_of(read_split(storage, join_uri(dataset, "split.csv"))) == recorded, "split.csv: this run's view"
    assert sides_of(read_placements(storage, dataset).table) == recorded
    assert [storage.exists(batch_uri(dataset, n)) for n in (1, 2, 3)] == [True, True, False], "nothing new: no batch"


def test_an_id_whose_download_failed_comes_back_on_its_side(tmp_path: Path) -> None:
    storage = Storage()
    dataset = (tmp_path / "demo").as_uri()
    manifest = {f"{i:05d}": 1 + i % 5 for i in range(200)}
    first = sides_of(record_split(storage, dataset, manifest, downloaded_for(manifest), SOURCE).table)
    gone = set(list(manifest)[::7])
    partial = {i: entry for i, entry in downloaded_for(manifest).items() if i not in gone}
    view = record_split(storage, dataset, manifest, partial, SOURCE, seed=5)
    assert set(view.table["id"]) == set(manifest) - gone and view.remembered == len(manifest)
    back = record_split(storage, dataset, manifest, downloaded_for(manifest), SOURCE, seed=9)
    assert sides_of(back.table) == first and back.placed == 0


def test_a_dataset_written_before_the_record_keeps_its_sides_through_a_subset_run(tmp_path: Path) -> None:
    """Only split.csv, as the old code left it: it is the first placement, written as batch 1 by the next run."""
    storage = Storage()
    dataset = (tmp_path / "old").as_uri()
    old = pd.DataFrame(
        [
            {
                "id": f"{i:05d}",
                "label": 1 + i % 5,
                "split": "test" if i < 10 else "valid" if i < 20 else "train",  # not what a fresh split would pick
                "uri": f"{SOURCE}/bin-images/{i:05d}.jpg",
                "sha256": "0" * 64,
            }
            for i in range(100)
        ]
    )
    write_split(old, storage, join_uri(dataset, "split.csv"))
    assert read_placements(storage, dataset).legacy

    subset = {f"{i:05d}": 1 + i % 5 for i in [*range(30), *range(60, 130)]}  # 70 of the old ids, 30 new ones
    view = record_split(storage, dataset, subset, downloaded_for(subset), SOURCE)
    assert (view.kept, view.placed, view.remembered) == (70, 30, 130)
    record = read_placements(storage, dataset)
    assert not record.legacy and record.batches == 1
    assert {i: side for i, side in sides_of(record.table).items() if i in set(old["id"])} == sides_of(old)

    everything = {f"{i:05d}": 1 + i % 5 for i in range(130)}
    again = record_split(storage, dataset, everything, downloaded_for(everything), SOURCE)
    assert {i: sides_of(again.table)[i] for i in old["id"]} == sides_of(old), "an old id moved"


def test_concurrent_runs_place_each_id_once_and_agree_with_the_record(s3_server, s3_client) -> None:
    """Eight runs at once on one dataset, each with ids the others also place: every id gets one side, and
    each run's view is the record's (a run that lost the race for a batch reads the record again)."""
    s3_client.create_bucket(Bucket="split-race")
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url)
    dataset = "s3://split-race/datasets/abid"
    manifests = [{f"{i:05d}": 1 + i % 5 for i in range(run * 40, run * 40 + 200)} for run in range(8)]
    views = {}
    start = threading.Barrier(len(manifests))

    def run(number: int) -> None:
        start.wait()
        manifest = manifests[number]
        views[number] = record_split(storage, dataset, manifest, downloaded_for(manifest), SOURCE, seed=number)

    s3_server.latency_s = 0.005
    try:
        threads = [threading.Thread(target=run, args=(n,)) for n in range(len(manifests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        s3_server.latency_s = 0.0
    assert sorted(views) == list(range(len(manifests)))
    batches = [read_split_batch(storage, dataset, n) for n in range(1, read_placements(storage, dataset).batches + 1)]
    placed = pd.concat(batches)["id"]
    assert placed.is_unique, "an id was placed twice"
    record = sides_of(read_placements(storage, dataset).table)
    assert len(record) == 40 * 7 + 200
    for number, view in views.items():
        assert sides_of(view.table) == {i: record[i] for i in manifests[number]}, f"run {number} disagrees"


def read_split_batch(storage: Storage, dataset: str, number: int) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(storage.read_bytes(batch_uri(dataset, number))), dtype={"id": str})
