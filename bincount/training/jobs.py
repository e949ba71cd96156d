"""Plain records of training jobs: what to run (:class:`TrainingJobSpec`) and what came of it.

Jobs lay out their results like SageMaker's::

    {output_uri}/{name}/output/model.tar.gz     model dir packed (files at the archive root)
    {output_uri}/{name}/output/output.tar.gz    SM_OUTPUT_DATA_DIR packed (history, profiler trace + summary)
    {output_uri}/{name}/debug-output/...        smdebug tensors, when the debugger is on
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any

from bincount.storage import Storage

JOB_PREFIX = "bincount-train"
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


def job_name(*parts: str | int) -> str:
    """``bincount-train-<parts>``, trimmed to SageMaker's 63-character job-name rule."""
    name = "-".join([JOB_PREFIX, *(re.sub(r"[^a-zA-Z0-9-]+", "-", str(part)).strip("-") for part in parts)])
    name = name[:63].rstrip("-")
    if not _JOB_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid training job name (letters, digits, hyphens; 63 at most)")
    return name


@dataclass(frozen=True)
class TrainingJobSpec:
    """A training job to run: ``channels`` maps ``train``/``valid``/``test`` to channel URIs.

    ``local_cpus`` is the local backend's share of this machine's cores for the job (when jobs run
    side by side); SageMaker gives each job its own instance and ignores it.
    """

    name: str
    hyperparameters: dict[str, Any]
    channels: dict[str, str]
    output_uri: str
    debugger: bool = False
    profiler: bool = False
    local_cpus: int | None = None

    def __post_init__(self) -> None:
        if not _JOB_NAME.match(self.name):
            raise ValueError(f"job name {self.name!r}: use letters, digits and hyphens, 63 at most")


@dataclass
class TrainingJob:
    """What a finished (or stopped) job left: status ``Completed``, ``Stopped`` or ``Failed``."""

    name: str
    status: str
    hyperparameters: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    metric_history: list[dict[str, float]] = field(default_factory=list)
    model_uri: str | None = None
    output_uri: str | None = None
    debug_output_uri: str | None = None
    failure_reason: str | None = None
    log_tail: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingJobFailed(RuntimeError):
    """A training job failed; ``job`` holds its record (reason and the tail of its log)."""

    def __init__(self, job: TrainingJob) -> None:
        tail = "\n".join(job.log_tail[-20:])
        super().__init__(f"training job {job.name} failed: {job.failure_reason}\n--- last log lines ---\n{tail}")
        self.job = job


def read_from_archive(storage: Storage, archive_uri: str, member: str) -> bytes:
    """One file out of a ``.tar.gz`` at ``archive_uri`` (``model.tar.gz`` or ``output.tar.gz``)."""
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(archive_uri)), mode="r:gz") as archive:
        try:
            extracted = archive.extractfile(member)
        except KeyError:
            extracted = None
        if extracted is None:
            raise FileNotFoundError(f"{archive_uri} holds no file {member!r}")
        return extracted.read()
