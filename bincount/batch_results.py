"""Batch transform results, read back from the ``.out`` files both backends leave (see bincount.contracts.serving)."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import pandas as pd

from bincount.contracts.serving import ERRORS_NAME, IMAGE_SUFFIXES, RESULTS_NAME, BatchTransformError
from bincount.storage import Storage, join_uri

_ROWS_AT_ONCE = 2000  # results.csv is written this many rows at a time: memory stays flat at any size


def image_id(key: str) -> str:
    """``1/abc.jpg`` -> ``abc``."""
    return PurePosixPath(key).stem


def label_from_key(key: str, classes: list[int]) -> int | None:
    """The label of a channel-layout key (``<split>/<count>/<id>.jpg``): the parent folder, if a class."""
    parent = PurePosixPath(key).parent.name
    return int(parent) if parent.isdigit() and int(parent) in classes else None


def load_labels(storage: Storage, labels_uri: str) -> dict[str, int]:
    """``id -> label`` from a CSV with ``id`` and ``label`` columns (a split.csv will do)."""
    table = pd.read_csv(io.BytesIO(storage.read_bytes(labels_uri)), dtype={"id": str})
    missing = {"id", "label"} - set(table.columns)
    if missing:
        raise BatchTransformError(f"{labels_uri} lacks columns {sorted(missing)}: labels need id and label")
    return dict(zip(table["id"], table["label"].astype(int), strict=True))


def relative_keys(storage: Storage, prefix_uri: str, suffixes: tuple[str, ...]) -> list[str]:
    base = prefix_uri.rstrip("/") + "/"
    return sorted(
        info.uri[len(base) :]
        for info in storage.list(prefix_uri)
        if info.uri.startswith(base) and info.uri.lower().endswith(suffixes)
    )


def results_table(
    storage: Storage,
    output_uri: str,
    keys: list[str],
    labels: Mapping[str, int] | None,
    classes: list[int],
    pool: ThreadPoolExecutor,
) -> pd.DataFrame:
    """One row per scored image of ``keys``, read back from the ``.out`` files (so reruns see earlier runs too)."""

    def row(key: str) -> dict:
        answer = json.loads(storage.read_bytes(join_uri(output_uri, f"{key}.out")))["predictions"][0]
        label = labels.get(image_id(key)) if labels is not None else label_from_key(key, classes)
        return {
            "id": image_id(key),
            "key": key,
            "predicted_count": answer["predicted_count"],
            **{f"prob_{count}": p for count, p in answer["probabilities"].items()},
            "label": label,
        }

    columns = ["id", "key", "predicted_count", *(f"prob_{count}" for count in classes), "label"]
    table = pd.DataFrame(list(pool.map(row, keys)), columns=columns)
    table["label"] = table["label"].astype("Int64")
    table["correct"] = (table["predicted_count"] == table["label"]).astype("boolean")
    return table


def list_inputs(storage: Storage, input_uri: str, output_uri: str) -> list[str]:
    """The image keys under ``input_uri``, relative to it.

    Raises:
        BatchTransformError: the prefixes overlap, or the input holds no images.
    """
    if output_uri.startswith(input_uri + "/") or output_uri == input_uri or input_uri.startswith(output_uri + "/"):
        raise BatchTransformError(
            f"input {input_uri} and output {output_uri} overlap: give an output prefix outside the input"
        )
    keys = relative_keys(storage, input_uri, IMAGE_SUFFIXES)
    if not keys:
        raise BatchTransformError(f"no .jpg, .jpeg or .png objects under {input_uri}")
    return keys


def write_tables(
    storage: Storage,
    output_uri: str,
    keys: list[str],
    *,
    labels: Mapping[str, int] | None,
    classes: list[int],
    errors: list[dict[str, str]],
    model_version: str,
) -> tuple[str, str | None, float | None]:
    """``results.csv`` from the ``.out`` files of ``keys`` and ``errors.csv`` (deleted when nothing failed).

    Returns the results URI, the errors URI (or None) and the accuracy over the images with a known label.
    """
    known = correct = 0
    with tempfile.TemporaryDirectory(prefix="batch-results-") as scratch, ThreadPoolExecutor(16) as pool:
        path = Path(scratch) / RESULTS_NAME
        with path.open("w", newline="") as handle:
            for start in range(0, max(len(keys), 1), _ROWS_AT_ONCE):  # one chunk in memory at a time
                table = results_table(storage, output_uri, keys[start : start + _ROWS_AT_ONCE], labels, classes, pool)
                table["model_version"] = model_version
                table.to_csv(handle, index=False, header=start == 0)
                labelled = table["correct"].dropna()
                known, correct = known + len(labelled), correct + int(labelled.sum())
        results_uri = join_uri(output_uri, RESULTS_NAME)
        storage.upload_file(path, results_uri)
    errors_uri = join_uri(output_uri, ERRORS_NAME)
    if errors:
        storage.write_bytes(errors_uri, pd.DataFrame(errors).to_csv(index=False).encode())
    else:
        storage.delete(errors_uri)  # a rerun that fixed every error leaves none listed
    accuracy = round(correct / known, 4) if known else None
    return results_uri, errors_uri if errors else None, accuracy
