"""Batch transform, in-process: score every image under a prefix, with SageMaker's output layout.

    input  {input_uri}/<key>.jpg          every .jpg/.jpeg/.png object under the prefix
    output {output_uri}/<key>.jpg.out     the JSON answer for that image (as the endpoint gives it)
           {output_uri}/results.csv       the joined table: id, key, predicted_count, prob_1..,
                                          label (where known), correct, model_version
           {output_uri}/errors.csv        the images that could not be read, and why
           {output_uri}/model.json        {"model_version": ...}: the model every .out came from

The model runs in batches on this machine (no HTTP per image); a thread pool reads and decodes
the next batches while the current one runs through the model. Resumable: an input whose
``.out`` exists is not scored again, and the table is rebuilt from every ``.out``. A resume with
another model than the one in ``model.json`` is refused (one table never mixes two models);
``rescore=True`` scores every image again. An unreadable image, or a key that would lead out of
the output prefix (``..``), is reported and skipped, never fatal; it is tried again on the next
run. A store that keeps failing (:class:`~bincount.storage.TransientStorageError`) fails the run,
and a retry resumes it.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd
import torch

from bincount.ids import UnsafeNameError, check_key
from bincount.serving.batcher import prepare_model_thread
from bincount.serving.host import available_cores
from bincount.storage import (
    ObjectNotFoundError,
    Storage,
    StorageError,
    TransientStorageError,
    join_uri,
)
from sm_scripts import inference

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RESULTS_NAME = "results.csv"
ERRORS_NAME = "errors.csv"
MODEL_NAME = "model.json"

ProgressFn = Callable[[int, int], None]


class BatchTransformError(ValueError):
    """The transform cannot start as asked (the message says how to fix the request)."""


@dataclass
class BatchTransformSummary:
    """What a batch transform did; plain values only (a Prefect task returns it)."""

    input_uri: str
    output_uri: str
    model_version: str
    images: int  # image objects under the input prefix
    scored: int  # scored in this run
    skipped: int  # already done by an earlier run
    failed: int  # unreadable images (see errors)
    seconds: float
    images_per_s: float  # scored in this run / seconds spent scoring
    results_uri: str
    errors_uri: str | None
    accuracy: float | None  # over the images with a known label
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Loaded:
    key: str
    pixels: torch.Tensor | None
    error: str | None


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
    return dict(zip(table["id"], table["label"].astype(int)))


def _relative_keys(storage: Storage, prefix_uri: str, suffixes: tuple[str, ...]) -> list[str]:
    base = prefix_uri.rstrip("/") + "/"
    return sorted(
        info.uri[len(base) :]
        for info in storage.list(prefix_uri)
        if info.uri.startswith(base) and info.uri.lower().endswith(suffixes)
    )


def run_batch_transform(
    storage: Storage,
    model_dir: Path,
    model_version: str,
    input_uri: str,
    output_uri: str,
    *,
    batch_size: int = 16,
    labels: Mapping[str, int] | None = None,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    rescore: bool = False,
) -> BatchTransformSummary:
    """Score every image under ``input_uri`` that has no ``.out`` under ``output_uri`` yet
    (every image, after deleting the old ``.out`` files, with ``rescore=True``).

    Raises:
        BatchTransformError: the prefixes overlap, the input holds no images, or the output
            holds another model's predictions and ``rescore`` is off.
    """
    input_uri, output_uri = input_uri.rstrip("/"), output_uri.rstrip("/")
    if output_uri.startswith(input_uri + "/") or output_uri == input_uri or input_uri.startswith(output_uri + "/"):
        raise BatchTransformError(
            f"input {input_uri} and output {output_uri} overlap: give an output prefix outside the input"
        )
    keys = _relative_keys(storage, input_uri, IMAGE_SUFFIXES)
    if not keys:
        raise BatchTransformError(f"no .jpg, .jpeg or .png objects under {input_uri}")
    done = _claim_output(storage, output_uri, model_version, rescore)
    errors: list[dict[str, str]] = []
    for key in keys:
        try:
            check_key(key, "input key")
        except UnsafeNameError as error:
            errors.append({"key": key, "error": str(error)})
    unsafe = {error["key"] for error in errors}
    pending = [key for key in keys if f"{key}.out" not in done and key not in unsafe]

    workers = workers or available_cores()

    def load(key: str) -> _Loaded:
        uri = join_uri(input_uri, key)
        try:
            data = storage.read_bytes(uri)
            return _Loaded(key, inference.preprocess(inference.input_fn(data, "application/x-image"), model), None)
        except TransientStorageError:
            raise  # the store, not the image: fail the run so that a retry resumes it
        except (inference.InputError, StorageError) as error:
            return _Loaded(key, None, str(error))

    def write(key: str, prediction: dict) -> None:
        body, _ = inference.output_fn([prediction], inference.JSON_CONTENT_TYPE)
        storage.write_bytes(join_uri(output_uri, f"{key}.out"), body.encode())

    finished = len(keys) - len(pending)
    if progress:
        progress(finished, len(keys))
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch-io") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-forward", initializer=prepare_model_thread) as model_thread,
    ):
        model = model_thread.submit(inference.model_fn, str(model_dir)).result()
        started = time.perf_counter()
        writes: list[Future] = []
        for batch in _prefetched_batches(pool, load, pending, batch_size):
            good = [item for item in batch if item.pixels is not None]
            errors.extend({"key": item.key, "error": item.error or ""} for item in batch if item.pixels is None)
            if good:
                pixels = torch.cat([item.pixels for item in good])
                predictions = model_thread.submit(inference.forward, pixels, model).result()
                writes.extend(pool.submit(write, item.key, p) for item, p in zip(good, predictions))
            finished += len(batch)
            if progress:
                progress(finished, len(keys))
        for future in writes:
            future.result()  # a failed write raises here: the transform is not done
    seconds = time.perf_counter() - started
    scored = len(pending) - (len(errors) - len(unsafe))

    failed_keys = {error["key"] for error in errors}
    table = results_table(storage, output_uri, [key for key in keys if key not in failed_keys], labels, model.classes)
    table["model_version"] = model_version
    results_uri = join_uri(output_uri, RESULTS_NAME)
    storage.write_bytes(results_uri, table.to_csv(index=False).encode())
    errors_uri = None
    if errors:
        errors_uri = join_uri(output_uri, ERRORS_NAME)
        storage.write_bytes(errors_uri, pd.DataFrame(errors).to_csv(index=False).encode())
    else:
        storage.delete(join_uri(output_uri, ERRORS_NAME))  # a rerun that fixed every error leaves none listed
    known = table.dropna(subset=["label"])
    return BatchTransformSummary(
        input_uri=input_uri,
        output_uri=output_uri,
        model_version=model_version,
        images=len(keys),
        scored=scored,
        skipped=len(keys) - len(pending) - len(unsafe),
        failed=len(errors),
        seconds=round(seconds, 3),
        images_per_s=round(scored / seconds, 2) if scored and seconds > 0 else 0.0,
        results_uri=results_uri,
        errors_uri=errors_uri,
        accuracy=round(float(known["correct"].mean()), 4) if len(known) else None,
        errors=errors,
    )


def _claim_output(storage: Storage, output_uri: str, model_version: str, rescore: bool) -> set[str]:
    """Record ``model_version`` as the model of ``output_uri``; return the ``.out`` keys it may resume from.

    Raises:
        BatchTransformError: the ``.out`` files there came from another (or an unrecorded) model
            and ``rescore`` is off.
    """
    marker = join_uri(output_uri, MODEL_NAME)
    done = set(_relative_keys(storage, output_uri, (".out",)))
    try:
        previous = json.loads(storage.read_bytes(marker))["model_version"]
    except ObjectNotFoundError:
        previous = None
    if done and previous != model_version and not rescore:
        written_by = f"model {previous}" if previous else "an unrecorded model"
        raise BatchTransformError(
            f"{output_uri} holds {len(done)} predictions of {written_by}, not of model {model_version}: "
            "give a new output prefix, or rescore=True to score every image again with this model"
        )
    if done and rescore:
        for key in done:
            storage.delete(join_uri(output_uri, key))
        done = set()
    storage.write_bytes(marker, json.dumps({"model_version": model_version}).encode())
    return done


def _prefetched_batches(
    pool: ThreadPoolExecutor, load: Callable[[str], _Loaded], keys: list[str], batch_size: int, ahead: int = 2
) -> Iterator[list[_Loaded]]:
    """Batches of loaded images, with up to ``ahead`` more batches loading in ``pool`` meanwhile."""
    chunks = [keys[start : start + batch_size] for start in range(0, len(keys), batch_size)]
    queued: list[list[Future]] = []
    for chunk in chunks:
        queued.append([pool.submit(load, key) for key in chunk])
        if len(queued) > ahead:
            yield [future.result() for future in queued.pop(0)]
    for futures in queued:
        yield [future.result() for future in futures]


def results_table(
    storage: Storage, output_uri: str, keys: list[str], labels: Mapping[str, int] | None, classes: list[int]
) -> pd.DataFrame:
    """One row per scored image, read back from the ``.out`` files (so reruns see earlier runs too)."""

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

    with ThreadPoolExecutor(max_workers=16) as pool:
        rows = list(pool.map(row, keys))
    columns = ["id", "key", "predicted_count", *(f"prob_{count}" for count in classes), "label"]
    table = pd.DataFrame(rows, columns=columns)
    table["label"] = table["label"].astype("Int64")
    table["correct"] = (table["predicted_count"] == table["label"]).astype("boolean")
    return table
