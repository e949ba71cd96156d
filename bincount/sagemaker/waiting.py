"""Follow a SageMaker job or endpoint to a final status: describe first, poll with backoff, stop on the way out.

:func:`describe_or_none` tells a retried task whether its job already exists (then it follows it
instead of creating a second one). :func:`wait_for` polls with exponential backoff, reports every
status and secondary-status change through a callback (the Prefect task's logger), streams the
job's CloudWatch log lines into the same callback as they arrive (:class:`LogFollower`), and stops
the job when the wait times out or is interrupted (KeyboardInterrupt, a Prefect cancellation or
task timeout), so nothing keeps running and billing after the flow gave up on it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from bincount.contracts.training import LOG_TAIL_LINES, LogSink

TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TRANSFORM_LOG_GROUP = "/aws/sagemaker/TransformJobs"


class SageMakerJobFailed(RuntimeError):
    """A job ended Failed (or Stopped where it had to complete); the message carries its FailureReason."""

    def __init__(self, kind: str, name: str, status: str, failure_reason: str | None) -> None:
        super().__init__(f"{kind} {name} ended {status}: {failure_reason or 'no FailureReason given'}")
        self.name, self.status, self.failure_reason = name, status, failure_reason


class SageMakerWaitTimeout(RuntimeError):
    """A job or endpoint did not reach a final status in time; a job was asked to stop."""


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
    "training job",
    "describe_training_job",
    "TrainingJobName",
    "TrainingJobStatus",
    frozenset({"Completed", "Failed", "Stopped"}),
    "stop_training_job",
)
TUNING_JOB = JobKind(
    "tuning job",
    "describe_hyper_parameter_tuning_job",
    "HyperParameterTuningJobName",
    "HyperParameterTuningJobStatus",
    frozenset({"Completed", "Failed", "Stopped"}),
    "stop_hyper_parameter_tuning_job",
)
TRANSFORM_JOB = JobKind(
    "transform job",
    "describe_transform_job",
    "TransformJobName",
    "TransformJobStatus",
    frozenset({"Completed", "Failed", "Stopped"}),
    "stop_transform_job",
)
ENDPOINT = JobKind(
    "endpoint",
    "describe_endpoint",
    "EndpointName",
    "EndpointStatus",
    frozenset({"InService", "Failed", "OutOfService", "UpdateRollbackFailed"}),
)


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def is_not_found(error: ClientError) -> bool:
    """Whether a describe call failed because the resource does not exist."""
    code = error_code(error)
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


class LogFollower:
    """Streams the CloudWatch log events of one job to ``sink``, each event once, as they arrive.

    SageMaker's containers log to ``<log_group>/<job name>/<host>`` (a stream per instance; a
    transform job adds ``<host>/data-log``). Each :meth:`poll` lists the job's streams and reads
    every stream forward from where the last poll stopped (``nextForwardToken``). A group or
    stream that does not exist yet is simply nothing to read yet. Reading the log must never cost
    the job: an API error is reported through ``sink`` (once per distinct error) and the next
    poll tries again; a missing permission is reported once, and the follower stops asking.

    Example:
        ``LogFollower(session.boto_session.client("logs"), TRAINING_LOG_GROUP, name, logger.info)``
    """

    def __init__(
        self, logs_client: Any, log_group: str, job_name: str, sink: LogSink, tail_lines: int = LOG_TAIL_LINES
    ) -> None:
        self.logs, self.group, self.job_name, self.sink = logs_client, log_group, job_name, sink
        self.tokens: dict[str, str | None] = {}  # stream name -> nextForwardToken (None: read from its head)
        self.tail: deque[str] = deque(maxlen=tail_lines)  # the last lines passed on (a failure's traceback)
        self.problem: str | None = None
        self.denied = False

    def poll(self) -> None:
        """Pass on every event logged since the last poll."""
        if self.denied:
            return
        lines: list[str] = []
        try:
            self._find_streams()
            for stream in sorted(self.tokens):
                self._read(stream, lines)
        except ClientError as error:
            code = error_code(error)
            if code not in ("ResourceNotFoundException", "ResourceNotFound"):  # that is: nothing logged yet
                self._report(error, denied=code in ("AccessDeniedException", "UnrecognizedClientException"))
        except BotoCoreError as error:
            self._report(error, denied=False)
        for line in lines:  # outside the try: the sink's own errors are not the log API's
            self.tail.append(line)
            self.sink(line)

    def _find_streams(self) -> None:
        pages = self.logs.get_paginator("describe_log_streams").paginate(
            logGroupName=self.group, logStreamNamePrefix=f"{self.job_name}/"
        )
        for page in pages:
            for stream in page["logStreams"]:
                self.tokens.setdefault(stream["logStreamName"], None)

    def _read(self, stream: str, lines: list[str]) -> None:
        """Append ``stream``'s new events to ``lines``, moving its token forward."""
        prefix = f"[{stream[len(self.job_name) + 1 :]}] " if len(self.tokens) > 1 else ""  # several instances
        while True:
            token = self.tokens[stream]
            request: dict[str, Any] = {"logGroupName": self.group, "logStreamName": stream, "startFromHead": True}
            if token is not None:
                request["nextToken"] = token
            page = self.logs.get_log_events(**request)
            lines.extend(prefix + event["message"].rstrip("\n") for event in page["events"])
            self.tokens[stream] = page["nextForwardToken"]
            if page["nextForwardToken"] == token:  # CloudWatch's end of the stream, for now
                return

    def _report(self, error: Exception, denied: bool) -> None:
        problem = f"{type(error).__name__}: {error}"
        if problem == self.problem:
            return
        self.problem, self.denied = problem, denied
        advice = (
            "grant logs:DescribeLogStreams and logs:GetLogEvents (docs/AWS.md); the job's log stays in CloudWatch"
            if denied
            else "trying again at the next status poll"
        )
        self.sink(f"cannot read the CloudWatch log of {self.job_name} in {self.group} ({problem}): {advice}")


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 5.0
    max_s: float = 60.0
    factor: float = 1.5


def poll_until(
    check: Callable[[], bool],
    *,
    timeout_s: float,
    backoff: Backoff = Backoff(),
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Call ``check`` until it returns True, waiting longer between calls as ``backoff`` says.

    Returns True when ``check`` did, False when ``timeout_s`` passed first (``check`` runs at least once).
    """
    deadline = clock() + timeout_s
    delay = backoff.initial_s
    while not check():
        remaining = deadline - clock()
        if remaining <= 0:
            return False
        sleep(min(delay, remaining))
        delay = min(delay * backoff.factor, backoff.max_s)
    return True


def wait_for(
    client: Any,
    kind: JobKind,
    name: str,
    *,
    on_event: LogSink,
    timeout_s: float,
    backoff: Backoff = Backoff(),
    logs: LogFollower | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll ``name`` until its status is final; return the last description.

    Every poll reports status changes and new secondary-status transitions to ``on_event`` and
    passes on the job's new log lines when a ``logs`` follower is given.

    Raises:
        SageMakerWaitTimeout: not final after ``timeout_s``; the job was asked to stop.
    """
    last: tuple[str, str | None] | None = None
    transitions_seen = 0
    description: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last, transitions_seen, description
        description = getattr(client, kind.describe)(**{kind.name_param: name})
        status, secondary = description[kind.status_key], description.get("SecondaryStatus")
        if (status, secondary) != last:
            on_event(f"{kind.label} {name} is {status}" + (f" ({secondary})" if secondary else ""))
            last = (status, secondary)
        transitions = description.get("SecondaryStatusTransitions", [])
        for transition in transitions[transitions_seen:]:
            on_event(f"{kind.label} {name}: {transition['Status']}: {transition.get('StatusMessage', '')}".rstrip(": "))
        transitions_seen = len(transitions)
        if logs is not None:
            logs.poll()
        return status in kind.final

    try:
        if not poll_until(check, timeout_s=timeout_s, backoff=backoff, sleep=sleep, clock=clock):
            raise SageMakerWaitTimeout(
                f"{kind.label} {name} is still {description[kind.status_key]} after {timeout_s:.0f} s"
                + ("; it was asked to stop" if kind.stop else "")
            )
        return description
    except BaseException as error:
        # Stop only when we give up on the job: a timeout, or an interrupt / cancellation / task timeout
        # (BaseException or TimeoutError). Any other error (a failing describe) leaves the job running
        # for the retried task to follow.
        gave_up = isinstance(error, (SageMakerWaitTimeout, TimeoutError)) or not isinstance(error, Exception)
        if gave_up and kind.stop and description.get(kind.status_key) not in kind.final:
            stop(client, kind, name, on_event)
        raise


def stop(client: Any, kind: JobKind, name: str, on_event: LogSink) -> None:
    """Ask SageMaker to stop ``name``; a refusal is reported (the caller is already raising)."""
    assert kind.stop is not None
    on_event(f"stopping {kind.label} {name}")
    try:
        getattr(client, kind.stop)(**{kind.name_param: name})
    except ClientError as error:
        on_event(f"could not stop {kind.label} {name}: {error}")
