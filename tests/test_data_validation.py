"""Data validation: the checks name the images they fail on; a pipeline fed a duplicated set stops before training."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bincount.config import Location
from bincount.demo_data import generate_demo_bucket, jpeg_bytes, render_bin_image
from bincount.storage import Storage
from bincount.validation import ValidationThresholds, validate_dataset
from flows.data import DataOptions
from flows.pipeline import pipeline


def mirror(tmp_path: Path, labels: list[int], darken: float = 1.0, seed: int = 0) -> tuple[pd.DataFrame, Path]:
    """A local mirror (bin-images/<id>.jpg) and its split table: 80/10/10 by position."""
    rng = np.random.default_rng(seed)
    local = tmp_path / f"raw-{seed}"
    rows = []
    for n, label in enumerate(labels):
        image_id = f"{seed}{n:04d}"
        pixels = np.asarray(render_bin_image(label, rng, size=64), dtype=np.float32) * darken
        data = jpeg_bytes(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
        path = local / "bin-images" / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        side = "train" if n % 10 < 8 else "valid" if n % 10 == 8 else "test"
        rows.append({"id": image_id, "label": label, "split": side, "sha256": hashlib.sha256(data).hexdigest()})
    return pd.DataFrame(rows), local


def test_each_check_names_its_images(tmp_path: Path) -> None:
    table, local = mirror(tmp_path, [1 + n % 5 for n in range(50)])
    ok = validate_dataset(table, local, None, ValidationThresholds())
    assert ok.passed, ok.failure_message()

    broken = table.copy()
    (local / "bin-images" / f"{table.id[3]}.jpg").write_bytes(
        (local / "bin-images" / f"{table.id[3]}.jpg").read_bytes()[:300]
    )
    shutil.copy(
        local / "bin-images" / f"{table.id[0]}.jpg", local / "bin-images" / f"{table.id[9]}.jpg"
    )  # train photo on test
    broken.loc[9, "sha256"] = broken.loc[0, "sha256"]
    broken.loc[5, "label"] = 7
    report = validate_dataset(broken, local, None, ValidationThresholds())
    message = report.failure_message()
    assert not report.passed
    assert f"decodes: 1 images do not decode (images: {table.id[3]} (OSError))" in message
    assert (
        "duplicates: 1 photos are on more than one side" in message
        and f"{table.id[0]} (train)" in message
        and f"{table.id[9]} (test)" in message
    )
    assert f"labels: 1 labels outside 1-5 (images: {table.id[5]} (label 7))" in message

    darker, dark_local = mirror(tmp_path, [1] * 30 + [2] * 20, darken=0.4, seed=1)
    shifted = validate_dataset(darker, dark_local, ok.statistics, ValidationThresholds())
    assert "shift: against the previous version: count 1" in shifted.failure_message()
    assert "brightness KS" in shifted.failure_message()
    assert "class-balance: counts below 2% of the training side: count 3: 0.0%" in shifted.failure_message()


def test_a_pipeline_fed_a_duplicated_set_stops_before_training(prefect_server: None, tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    generate_demo_bucket(Storage(), bucket.as_uri(), images=60, seed=5, size=48)
    for copy in [
        f"{n:05d}" for n in range(2, 13)
    ]:  # the same photo under eleven more ids: they land on different sides
        shutil.copy(bucket / "bin-images" / "00001.jpg", bucket / "bin-images" / f"{copy}.jpg")
    location = Location(
        artifact_root=str(tmp_path / "artifacts"), data_dir=str(tmp_path / "raw"), source_uri=str(bucket)
    )
    state = pipeline(data=DataOptions(max_missing_share=0.2), location=location, return_state=True)
    assert state.is_failed()
    with pytest.raises(
        Exception,
        match=r"data validation failed, so nothing was trained: duplicates: 1 photos are on more than one side",
    ) as caught:
        state.result()
    assert "00001" in str(caught.value)
    assert not (tmp_path / "artifacts" / "training-jobs").exists()


def test_photos_harvested_from_production_are_left_out_of_the_shift_check_and_nothing_else(tmp_path: Path) -> None:
    table, local = mirror(tmp_path, [1 + n % 5 for n in range(50)])
    accepted = validate_dataset(table, local, None, ValidationThresholds())
    darker, dark_local = mirror(tmp_path, [1 + n % 5 for n in range(40)], darken=0.4, seed=1)
    for row in darker.itertuples():
        (local / "bin-images" / f"{row.id}.jpg").write_bytes((dark_local / "bin-images" / f"{row.id}.jpg").read_bytes())
    as_originals = pd.concat([table, darker], ignore_index=True)
    assert (
        "brightness KS"
        in validate_dataset(as_originals, local, accepted.statistics, ValidationThresholds()).failure_message()
    )

    harvested_ids = {row.id: f"fb-{row.sha256[:32]}" for row in darker.itertuples()}
    for old, new in harvested_ids.items():
        (local / "bin-images" / f"{old}.jpg").rename(local / "bin-images" / f"{new}.jpg")
    with_harvest = pd.concat([table, darker.assign(id=darker.id.map(harvested_ids))], ignore_index=True)
    report = validate_dataset(with_harvest, local, accepted.statistics, ValidationThresholds())
    assert report.passed, report.failure_message()
    (shift,) = [check for check in report.checks if check.check == "shift"]
    assert "32 training photos harvested from production left out" in shift.message
    assert report.statistics == accepted.statistics, "the statistics kept for the next version are the originals'"

    (local / "bin-images" / f"{with_harvest.id.iloc[-1]}.jpg").write_bytes(b"not a jpeg")
    assert (
        "decodes: 1 images do not decode"
        in validate_dataset(with_harvest, local, accepted.statistics, ValidationThresholds()).failure_message()
    ), "every other check still covers harvested photos"
