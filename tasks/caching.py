"""Cache keys for tasks whose inputs name data by URI: the key covers what the URIs hold now.

A channel URI stays the same while the images under it change between runs, so a key made of the
URI alone would serve a stale result. These keys add a listing of every object: its URI and size,
and its content (the SHA-256 of a local file, remembered by mtime so that re-runs read nothing new;
S3's ETag, which changes with the content for multipart uploads too), and, for training, the hash
of all of ``sm_scripts/``, which runs in a subprocess (or a SageMaker container) where Prefect's
``TASK_SOURCE`` cannot see it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from bincount.code import code_hash
from bincount.config import Settings
from bincount.optimize import ParityRule, export_tool_versions
from bincount.storage import folder_digests, local_path, storage_for


def listing(settings: Settings, *uris: str) -> list[tuple[str, int, str | None]]:
    """Every object under ``uris``: URI, size and a content digest (local: SHA-256; S3: the ETag)."""
    storage = storage_for(settings)
    rows: list[tuple[str, int, str | None]] = []
    for uri in uris:
        digests = folder_digests(local_path(uri)) if uri.startswith("file://") else {}
        rows += [(info.uri, info.size, digests.get(info.uri, info.etag)) for info in storage.list(uri)]
    return rows


def training_job_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Everything a training job's result depends on except its name (unique per run).

    A tuning trial's job is keyed with the trial (its number and pruning bar) beside it.
    """
    settings, trial = parameters["settings"], parameters.get("trial")
    spec = trial.job if trial is not None else parameters["spec"]
    return hash_objects(
        settings.profile,
        spec.hyperparameters,
        spec.channels,
        listing(settings, *spec.channels.values()),
        spec.output_uri,
        spec.debugger,
        spec.profiler,
        None if trial is None else (trial.number, trial.prune_below),
        code_hash(),
    )


def evaluation_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    settings = parameters["settings"]
    test_channel = parameters["test_channel_uri"]
    return hash_objects(parameters["model_uri"], test_channel, listing(settings, test_channel))


TRAINING_JOB_CACHE = CacheKeyFnPolicy(cache_key_fn=training_job_key) + TASK_SOURCE
EVALUATION_CACHE = CacheKeyFnPolicy(cache_key_fn=evaluation_key) + TASK_SOURCE


def optimization_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The model, where the optimized one goes, what the calibration, validation and test channels hold,
    the export tools' versions (an export that failed for want of one is tried again once it is there) and the
    parity rule (a result judged under another rule is judged again)."""
    settings = parameters["settings"]
    channels = tuple(parameters[f"{name}_channel_uri"] for name in ("train", "valid", "test"))
    return hash_objects(
        parameters["model_uri"],
        parameters["output_uri"],
        channels,
        listing(settings, *channels),
        export_tool_versions(),
        asdict(ParityRule()),
    )


OPTIMIZATION_CACHE = CacheKeyFnPolicy(cache_key_fn=optimization_key) + TASK_SOURCE
