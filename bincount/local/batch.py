"""Batch transform, in-process: score every image under a prefix, with SageMaker's output layout.

    input  {input_uri}/<key>.jpg          every .jpg/.jpeg/.png object under the prefix
    output {output_uri}/<key>.jpg.out     the JSON answer for that image (as the endpoint gives it)
           {output_uri}/results.csv       the joined table: id, key, predicted_count, prob_1..,
                                          label (where known), correct, model_version
           {output_uri}/errors.csv        the images that could not be read, and why
           {output_uri}/model.json        {"model_version": ...}: the model every .out came from

The model runs in batches on this machine (no HTTP per image); a thread pool reads and decodes
the next batches while the current one runs through the model. Memory stays flat in the number of
images (but for the list of keys): a few batches are read ahead, a few batches of ``.out`` writes are in
flight, and ``results.csv`` is written a chunk at a time. Resumable: an input whose
``.out`` exists is not scored again, and the table is rebuilt from every ``.out``. A resume with
another model than the one in ``model.json`` is refused (one table never mixes two models);
``rescore=True`` scores every image again. An unreadable image, or a key that would lead out of
the output prefix (``..``), is reported and skipped, never fatal; it is tried again on the next
run. A store that keeps failing (:class:`~bincount.storage.TransientStorageError`) fails the run,
and a retry resumes it.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from bincount.batch_results import list_inputs, relative_keys, write_tables
from bincount.contracts.serving import MODEL_NAME, BatchTransformError, BatchTransformSummary, ProgressFn
from bincount.ids import UnsafeNameError, check_key
from bincount.local.batcher import available_cores, prepare_model_thread
from bincount.storage import ObjectNotFoundError, Storage, StorageError, TransientStorageError, join_uri
from sm_scripts import inference

_WRITES_IN_FLIGHT = 4  # batches of .out writes queued at most: memory stays flat however many images


@dataclass
class _Loaded:
    key: str
    pixels: torch.Tensor | None
    error: str | None


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
    keys = list_inputs(storage, input_uri, output_uri)
    done = _claim_output(storage, output_uri, model_version, rescore)
    errors = _unsafe_keys(keys)
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
        ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="model-forward", initializer=prepare_model_thread
        ) as model_thread,
    ):
        model = model_thread.submit(inference.model_fn, str(model_dir)).result()
        started = time.perf_counter()
        writes: deque[Future] = deque()  # in flight; a failed write raises when collected: the transform is not done
        for batch in _prefetched_batches(pool, load, pending, batch_size):
            good = [item for item in batch if item.pixels is not None]
            errors.extend({"key": item.key, "error": item.error or ""} for item in batch if item.pixels is None)
            if good:
                pixels = torch.cat([item.pixels for item in good])
                predictions = model_thread.submit(inference.forward, pixels, model).result()
                writes.extend(pool.submit(write, item.key, p) for item, p in zip(good, predictions, strict=True))
            _collect(writes, keep=_WRITES_IN_FLIGHT * batch_size)
            finished += len(batch)
            if progress:
                progress(finished, len(keys))
        _collect(writes, keep=0)
    seconds = time.perf_counter() - started
    scored = len(pending) - (len(errors) - len(unsafe))

    failed_keys = {error["key"] for error in errors}
    scored_keys = [key for key in keys if key not in failed_keys]
    results_uri, errors_uri, accuracy = write_tables(
        storage,
        output_uri,
        scored_keys,
        labels=labels,
        classes=model.classes,
        errors=errors,
        model_version=model_version,
    )
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
        accuracy=accuracy,
        errors=errors,
    )


def _collect(writes: deque[Future], keep: int) -> None:
    """Collect the finished writes, and wait for the oldest until at most ``keep`` are in flight (a failed write
    raises here: the transform is not done)."""
    while writes and (writes[0].done() or len(writes) > keep):
        writes.popleft().result()


def _unsafe_keys(keys: list[str]) -> list[dict[str, str]]:
    """An error row for each key that would lead out of the output prefix (never scored nor written)."""
    errors = []
    for key in keys:
        try:
            check_key(key, "input key")
        except UnsafeNameError as error:
            errors.append({"key": key, "error": str(error)})
    return errors


def _claim_output(storage: Storage, output_uri: str, model_version: str, rescore: bool) -> set[str]:
    """Record ``model_version`` as the model of ``output_uri``; return the ``.out`` keys it may resume from.

    Raises:
        BatchTransformError: the ``.out`` files there came from another (or an unrecorded) model
            and ``rescore`` is off.
    """
    marker = join_uri(output_uri, MODEL_NAME)
    done = set(relative_keys(storage, output_uri, (".out",)))
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
    queued: deque[list[Future]] = deque()
    for start in range(0, len(keys), batch_size):
        queued.append([pool.submit(load, key) for key in keys[start : start + batch_size]])
        if len(queued) > ahead:
            yield [future.result() for future in queued.popleft()]
    for futures in queued:
        yield [future.result() for future in futures]
