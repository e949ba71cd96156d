"""Batch transform, in-process: score every image under a prefix, with SageMaker's output layout.

    input  {input_uri}/<key>.jpg          every .jpg/.jpeg/.png object under the prefix
    output {output_uri}/<key>.jpg.out     the JSON answer for that image (as the endpoint gives it)
           {output_uri}/results.csv       the joined table: id, key, predicted_count, prob_1..,
                                          label (where known), correct
           {output_uri}/errors.csv        the images that could not be read, and why

The model runs in batches on this machine (no HTTP per image); a thread pool reads and decodes
the next batches while the current one runs through the model. Resumable: an input whose
``.out`` exists is not scored again, and the table is rebuilt from every ``.out``. An unreadable
image is reported and skipped, never fatal; it is tried again on the next run. A store that keeps
failing (:class:`~bincount.storage.TransientStorageError`) fails the run, and a retry resumes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from bincount.batch_results import list_inputs, relative_keys, write_tables
from bincount.contracts.serving import BatchTransformSummary, ProgressFn
from bincount.local.batcher import available_cores, prepare_model_thread
from bincount.storage import Storage, StorageError, TransientStorageError, join_uri
from sm_scripts import inference


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
) -> BatchTransformSummary:
    """Score every image under ``input_uri`` that has no ``.out`` under ``output_uri`` yet.

    Raises:
        BatchTransformError: the prefixes overlap, or the input holds no images.
    """
    input_uri, output_uri = input_uri.rstrip("/"), output_uri.rstrip("/")
    keys = list_inputs(storage, input_uri, output_uri)
    done = set(relative_keys(storage, output_uri, (".out",)))
    pending = [key for key in keys if f"{key}.out" not in done]

    workers = workers or available_cores()
    errors: list[dict[str, str]] = []

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
    scored = len(pending) - len(errors)

    failed_keys = {error["key"] for error in errors}
    scored_keys = [key for key in keys if key not in failed_keys]
    results_uri, errors_uri, accuracy = write_tables(storage, output_uri, scored_keys, labels, model.classes, errors)
    return BatchTransformSummary(
        input_uri=input_uri,
        output_uri=output_uri,
        model_version=model_version,
        images=len(keys),
        scored=scored,
        skipped=len(keys) - len(pending),
        failed=len(errors),
        seconds=round(seconds, 3),
        images_per_s=round(scored / seconds, 2) if scored and seconds > 0 else 0.0,
        results_uri=results_uri,
        errors_uri=errors_uri,
        accuracy=accuracy,
        errors=errors,
    )


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
