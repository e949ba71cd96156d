"""Names that both backends accept: jobs, models, endpoint configs and endpoints.

SageMaker's rule (letters, digits and single or repeated hyphens, starting and ending with a letter
or digit, 63 characters at most; a tuning job 32) is the strictest of the two backends, so every
name in the project keeps it, whichever backend runs.
"""

from __future__ import annotations

import hashlib
import re

JOB_PREFIX = "bincount"
HASH_LENGTH = 10
NAME_LIMITS = {"training": 63, "tuning": 32, "transform": 63, "model": 63, "endpoint-config": 63, "endpoint": 63}
_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9])*")


def check_name(name: str, kind: str) -> str:
    """``name`` if it is a valid ``kind`` name (a key of :data:`NAME_LIMITS`), else a ValueError saying why."""
    limit = NAME_LIMITS[kind]
    if len(name) > limit or not _NAME.fullmatch(name):
        raise ValueError(
            f"{kind} name {name!r}: use letters, digits and hyphens (not at either end), {limit} characters at most"
        )
    return name


def check_endpoint_name(name: str) -> str:
    return check_name(name, "endpoint")


def short_hash(*parts: str | int, length: int = HASH_LENGTH) -> str:
    """Hex digest of ``parts`` (unambiguously joined), first ``length`` characters."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:length]


def job_name(stage: str, run_key: str, *identity: str | int, kind: str = "training") -> str:
    """The one way to name a job: ``bincount-<stage>-<hash of run_key and identity>``.

    ``run_key`` is the flow run's id, so two runs never share a job; ``identity`` is what the stage
    was asked to do (a trial's number, a transform's input), so one run's distinct jobs differ. The
    same flow run asking the same again (a Prefect retry) gets the same name, and follows the job
    its first attempt started instead of starting a second one. The stage is trimmed to fit the
    ``kind``'s limit; the hash is kept whole.

    Example:
        ``job_name("trial", str(flow_run.id), 3)`` -> ``"bincount-trial-<10 hex digits>"``;
        a tuning job: ``job_name("tune", str(flow_run.id), kind="tuning")``.
    """
    suffix = short_hash(run_key, *identity)
    stage = re.sub(r"[^a-zA-Z0-9]+", "-", stage).strip("-")
    if not stage:
        raise ValueError(f"job stage {stage!r}: give a stage of letters, digits and hyphens")
    limit = NAME_LIMITS[kind]
    name = f"{JOB_PREFIX}-{stage}"[: limit - len(suffix) - 1].rstrip("-") + f"-{suffix}"
    return check_name(name, kind)
