"""SageMaker's rules for the names of jobs, models and endpoint configs.

Job names come from :func:`bincount.training.jobs.job_name` (the one way to name a job, for both
backends): ``bincount-<stage>-<hash of the flow run and the request>``, so a retried task finds
the job it already started. This module only checks a finished name against SageMaker's limits.
"""

from __future__ import annotations

import re

NAME_LIMITS = {"training": 63, "tuning": 32, "transform": 63, "model": 63, "endpoint-config": 63}
_VALID = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")


def check_name(name: str, kind: str) -> str:
    """``name`` if SageMaker accepts it for ``kind`` (a key of ``NAME_LIMITS``), else a ValueError saying why."""
    limit = NAME_LIMITS[kind]
    if len(name) > limit or not _VALID.match(name):
        raise ValueError(f"{kind} name {name!r}: SageMaker wants letters, digits and hyphens, {limit} characters at most")
    return name
