"""The optimized form of a model: an OpenVINO IR (int8, quantized after training; accuracy control may
leave a few layers fp32) beside ``model.pt``.

The optimize stage (``bincount/optimize.py``) writes it and records it in ``model_info.json``
under ``"optimized"`` (docs/CONTRACTS.md); :func:`load_optimized` compiles it for serving. It
takes the same normalized float batch as the eager network and answers the same logits.

OpenVINO int8 was chosen by measurement on the project's CPUs (AVX-512 VNNI; ResNet-50 at 224 px,
2 threads, real ABID photos): about 3.5x the eager forward at batch 1, where OpenVINO fp32 gave
1.6x and ONNX Runtime fp32 less than eager (docs/BENCHMARKS.md, "Optimized model"). Anything that stops the
optimized form from serving here (another runtime named, OpenVINO missing or too old, a corrupt
file, a wrong output shape) raises :class:`OptimizedModelUnavailable` with the reason, and
``inference.model_fn`` serves the eager network instead.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RUNTIME = "openvino"
MIN_RUNTIME_VERSION = (2024, 0)  # IR v11 with NNCF's int8 FakeQuantize: read by 2024.0 and later
GRAPH_FILE = "optimized.xml"
WEIGHTS_FILE = "optimized.bin"
OPTIMIZED_FILES = (GRAPH_FILE, WEIGHTS_FILE)

LogitsFn = Callable[[np.ndarray], np.ndarray]


class OptimizedModelUnavailable(RuntimeError):
    """The optimized form cannot serve on this host; the message says why (eager serves instead)."""


def runtime_version() -> tuple[int, ...] | None:
    """The installed OpenVINO's (year, release), or None when it is not installed."""
    try:
        version = importlib.metadata.version(RUNTIME)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def optimized_entry(precision: str, parity: dict[str, Any]) -> dict[str, Any]:
    """``model_info.json``'s ``"optimized"`` value for an IR written as :data:`OPTIMIZED_FILES`."""
    return {
        "runtime": RUNTIME,
        "runtime_version": importlib.metadata.version(RUNTIME),
        "min_runtime_version": ".".join(map(str, MIN_RUNTIME_VERSION)),
        "precision": precision,
        "files": list(OPTIMIZED_FILES),
        "parity": parity,
    }


def load_optimized(model_dir: Path | str, info: dict[str, Any], threads: int) -> LogitsFn:
    """Compile the IR that ``info["optimized"]`` describes for this CPU with ``threads`` inference threads.

    Returns a function from a normalized float32 batch [N, 3, S, S] to logits [N, classes]. It is
    checked on one blank image before it is returned, so a file that reads but cannot run is
    refused here and not on the first request.

    Settings, measured (ResNet-50 int8, 224 px, 2 cores; docs/BENCHMARKS.md, "Optimized model"): OpenVINO's
    throughput hint (one stream per core, one thread each) with the batch split into one image per
    infer request gave 56-63 images/s where one batch-of-8 call under the latency hint gave 33-51
    and eight batch-1 calls 21-46. The host still micro-batches requests (up to 8, 5 ms): a batch
    is what keeps every stream busy. Call it from one thread at a time (a host's model thread).

    Raises:
        OptimizedModelUnavailable: why the eager network must serve instead.
    """
    entry = info["optimized"]
    if entry.get("runtime") != RUNTIME:
        raise OptimizedModelUnavailable(
            f"model_info.json names the runtime {entry.get('runtime')!r}; this inference.py serves {RUNTIME!r} only"
        )
    installed = runtime_version()
    if installed is None:
        raise OptimizedModelUnavailable(f"{RUNTIME} is not installed: pip install 'openvino>=2024.0' to serve it")
    needed = tuple(int(part) for part in str(entry.get("min_runtime_version", "0")).split("."))
    if installed < needed:
        raise OptimizedModelUnavailable(
            f"{RUNTIME} {'.'.join(map(str, installed))} is older than the {'.'.join(map(str, needed))} this model "
            "needs: upgrade openvino"
        )
    try:
        import openvino  # an optional runtime: installed, as checked above, but it may still not import
    except ImportError as error:  # a broken install: its native libraries missing or built for another Python
        raise OptimizedModelUnavailable(
            f"{RUNTIME} {'.'.join(map(str, installed))} is installed but does not import ({error}): reinstall it "
            "(pip install --force-reinstall 'openvino>=2024.0')"
        ) from None

    graph = Path(model_dir) / GRAPH_FILE
    size = int(info["image_size"])
    results: dict[int, np.ndarray] = {}
    try:
        compiled = openvino.Core().compile_model(
            str(graph), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "THROUGHPUT"}
        )
        queue = openvino.AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queue.set_callback(lambda request, index: results.__setitem__(index, request.get_output_tensor(0).data.copy()))

        def logits(batch: np.ndarray) -> np.ndarray:
            results.clear()
            for index in range(len(batch)):  # one image per request: the streams take them in parallel
                queue.start_async([batch[index : index + 1]], index)
            queue.wait_all()
            return np.concatenate([results[index] for index in range(len(batch))])

        probe = logits(np.zeros((1, 3, size, size), np.float32))
    except RuntimeError as error:  # OpenVINO raises RuntimeError for unreadable, corrupt or mismatched files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OptimizedModelUnavailable(f"{RUNTIME} cannot run {graph.name} ({reason})") from None
    if probe.shape != (1, len(info["classes"])):
        raise OptimizedModelUnavailable(
            f"{graph.name} answers shape {list(probe.shape)} for one image, not [1, {len(info['classes'])}]"
        )
    return logits
