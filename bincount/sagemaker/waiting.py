"""Follow a SageMaker job or endpoint to a final status: describe first, poll with backoff, stop on the way out.

:func:`describe_or_none` tells a retried task whether its job already exists (then it follows it
instead of creating a second one). :func:`wait_for` polls with exponential backoff, reports every
status and secondary-status change through a callback (the Prefect task's logger), and stops the
job when the wait times out or is interrupted (KeyboardInterrupt, a Prefect cancellation or task
timeout), so nothing keeps running and billing after the flow gave up on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

EventSink = Callable[[str], None]


class SageMakerJobFailed(RuntimeError):
    """A job ended Failed (or Stopped where it had to complete); the message carries its FailureReason."""

    def __init__(self, kind: str, name: str, status: str, failure_reason: str | None) -> None:
        super().__init__(f"{kind} {name} ended {status}: {failure_reason or 'no FailureReason given'}")
        self.name, self.status, self.failure_reason = name, status, failure_reason


class SageMakerWaitTimeout(RuntimeError):
    """A job did not reach a final status in time; it was asked to stop."""


@dataclass(frozen=True)
class JobKind:
    """How to describe, read and stop one kind of SageMaker resource."""

    label: str
    describe: str
    name_param: str
    status_key: str
    final: frozenset[str]
    stop: str | None = None


TRAINING_JOB = JobKind(
    "training job", "describe_training_job", "TrainingJobName", "TrainingJobStatus",
    frozenset({"Completed", "Failed", "Stopped"}), "stop_training_job",
)
TUNING_JOB = JobKind(
    "tuning job", "describe_hyper_parameter_tuning_job", "HyperParameterTuningJobName",
    "HyperParameterTuningJobStatus", frozenset({"Completed", "Failed", "Stopped"}), "stop_hyper_parameter_tuning_job",
)
TRANSFORM_JOB = JobKind(
    "transform job", "describe_transform_job", "TransformJobName", "TransformJobStatus",
    frozenset({"Completed", "Failed", "Stopped"}), "stop_transform_job",
)
ENDPOINT = JobKind(
    "endpoint", "describe_endpoint", "EndpointName", "EndpointStatus",
    frozenset({"InService", "Failed", "OutOfService", "UpdateRollbackFailed"}),
)


def is_not_found(error: ClientError) -> bool:
    """Whether a describe call failed because the resource does not exist."""
    code = error.response.get("Error", {}).get("Code", "")
    message = error.response.get("Error", {}).get("Message", "").lower()
    return code in ("ResourceNotFound", "ResourceNotFoundException") or (
        code == "ValidationException"
        and any(words in message for words in ("could not find", "not found", "can't find", "does not exist"))
    )


def describe_or_none(client: Any, kind: JobKind, name: str) -> dict[str, Any] | None:
    """The description of ``name``, or None when SageMaker has no such resource."""
    try:
        return getattr(client, kind.describe)(**{kind.name_param: name})
    except ClientError as error:
        if is_not_found(error):
            return None
        raise


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 5.0
    max_s: float = 60.0
    factor: float = 1.5


def wait_for(
    client: Any,
    kind: JobKind,
    name: str,
    *,
    on_event: EventSink,
    timeout_s: float,
    backoff: Backoff = Backoff(),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll ``name`` until its status is final; return the last description.

    Raises:
        SageMakerWaitTimeout: not final after ``timeout_s``; the job was asked to stop.
    """
    deadline = clock() + timeout_s
    delay = backoff.initial_s
    last: tuple[str, str | None] | None = None
    transitions_seen = 0
    description: dict[str, Any] = {}
    try:
        while True:
            description = getattr(client, kind.describe)(**{kind.name_param: name})
            status, secondary = description[kind.status_key], description.get("SecondaryStatus")
            if (status, secondary) != last:
                on_event(f"{kind.label} {name} is {status}" + (f" ({secondary})" if secondary else ""))
                last = (status, secondary)
            transitions = description.get("SecondaryStatusTransitions", [])
            for transition in transitions[transitions_seen:]:
                on_event(f"{kind.label} {name}: {transition['Status']}: {transition.get('StatusMessage', '')}".rstrip(": "))
            transitions_seen = len(transitions)
            if status in kind.final:
                return description
            remaining = deadline - clock()
            if remaining <= 0:
                raise SageMakerWaitTimeout(
                    f"{kind.label} {name} is still {status} after {timeout_s:.0f} s; it was asked to stop"
                )
            sleep(min(delay, remaining))
            delay = min(delay * backoff.factor, backoff.max_s)
    except BaseException as error:
        # Stop only when we give up on the job: a timeout, or an interrupt / cancellation / task timeout
        # (BaseException or TimeoutError). Any other error (a failing describe) leaves the job running
        # for the retried task to follow.
        gave_up = isinstance(error, (SageMakerWaitTimeout, TimeoutError)) or not isinstance(error, Exception)
        if gave_up and kind.stop and description.get(kind.status_key) not in kind.final:
            stop(client, kind, name, on_event)
        raise


def stop(client: Any, kind: JobKind, name: str, on_event: EventSink) -> None:
    """Ask SageMaker to stop ``name``; a refusal is reported (the caller is already raising)."""
    assert kind.stop is not None
    on_event(f"stopping {kind.label} {name}")
    try:
        getattr(client, kind.stop)(**{kind.name_param: name})
    except ClientError as error:
        on_event(f"could not stop {kind.label} {name}: {error}")
