"""Plain records of training jobs: what to run (:class:`TrainingJobSpec`) and what came of it.

Jobs lay out their results like SageMaker's::

    {output_uri}/{name}/output/model.tar.gz     model dir packed (files at the archive root)
    {output_uri}/{name}/output/output.tar.gz    SM_OUTPUT_DATA_DIR packed (history, profiler trace + summary)
    {output_uri}/{name}/debug-output/...        smdebug tensors, when the debugger is on
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import asdict, dataclass, field
from typing import Any

from bincount.storage import Storage

JOB_PREFIX = "bincount"
HASH_LENGTH = 10
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


def short_hash(*parts: str | int, length: int = HASH_LENGTH) -> str:
    """Hex digest of ``parts`` (unambiguously joined), first ``length`` characters."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:length]


def job_name(stage: str, run_key: str, *identity: str | int, limit: int = 63) -> str:
    """The one way to name a job: ``bincount-<stage>-<hash of run_key and identity>``.

    ``run_key`` is the flow run's id, so two runs never share a job; ``identity`` is what the stage
    was asked to do (a trial's number, a transform's input), so one run's distinct jobs differ. The
    same flow run asking the same again (a Prefect retry) gets the same name, and follows the job
    its first attempt started instead of starting a second one. The name keeps SageMaker's rules:
    letters, digits and hyphens, at most ``limit`` characters (63; a tuning job allows 32), the
    stage trimmed and the hash kept whole.

    Example:
        ``job_name("trial", str(flow_run.id), 3)`` -> ``"bincount-trial-<10 hex digits>"``;
        a tuning job: ``job_name("tune", str(flow_run.id), limit=32)``.
    """
    suffix = short_hash(run_key, *identity)
    stage = re.sub(r"[^a-zA-Z0-9]+", "-", stage).strip("-")
    name = f"{JOB_PREFIX}-{stage}"[: limit - len(suffix) - 1].rstrip("-") + f"-{suffix}"
    if not stage or not _JOB_NAME.match(name):
        raise ValueError(f"job name {name!r} from stage {stage!r}: give a stage of letters, digits and hyphens")
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
