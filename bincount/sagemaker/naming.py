"""Job names that make a retried task find the job it already started.

A name is ``bincount-<stage>-<hash>``: the hash covers the flow run's id (so two runs never share
a job) and what the stage was asked to do (so one run's distinct requests get distinct jobs).
The same flow run asking the same thing again (a Prefect retry) gets the same name.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "bincount"
HASH_LENGTH = 10
NAME_LIMITS = {"training": 63, "tuning": 32, "transform": 63, "model": 63, "endpoint-config": 63}
_VALID = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")


def short_hash(*parts: str, length: int = HASH_LENGTH) -> str:
    """Hex digest of ``parts`` (unambiguously joined), first ``length`` characters."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:length]


def stage_job_name(stage: str, run_key: str, *identity: str, limit: int = 63) -> str:
    """``bincount-<stage>-<hash(run_key, *identity)>``, at most ``limit`` characters.

    Example:
        ``stage_job_name("retrain", str(flow_run.id))`` -> ``"bincount-retrain-3f9c0a1b2d"``;
        a tuning job (SageMaker allows 32 characters): ``stage_job_name("tune", run_id, limit=32)``.
    """
    stage = re.sub(r"[^a-zA-Z0-9-]+", "-", stage).strip("-")
    suffix = short_hash(run_key, *identity)
    name = f"{PREFIX}-{stage}"[: limit - len(suffix) - 1].rstrip("-") + f"-{suffix}"
    if not _VALID.match(name):
        raise ValueError(f"{name!r} is not a valid SageMaker name (letters, digits, single hyphens)")
    return name


def check_name(name: str, kind: str) -> str:
    """``name`` if SageMaker accepts it for ``kind`` (a key of ``NAME_LIMITS``), else a ValueError saying why."""
    limit = NAME_LIMITS[kind]
    if len(name) > limit or not _VALID.match(name):
        raise ValueError(f"{kind} name {name!r}: SageMaker wants letters, digits and hyphens, {limit} characters at most")
    return name
