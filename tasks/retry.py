"""Which failures a task retries: only transient ones (storage, AWS throttling and 5xx, dropped
connections); bad input and bugs fail at once."""

from __future__ import annotations

import botocore.exceptions
from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from bincount.storage import TransientStorageError

_TRANSIENT_AWS_CODES = {
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "SlowDown",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalServerError",
    "RequestTimeout",
}


def is_transient_error(error: BaseException) -> bool:
    if isinstance(
        error, TransientStorageError | botocore.exceptions.ConnectionError | botocore.exceptions.ReadTimeoutError
    ):
        return True
    if isinstance(error, botocore.exceptions.ClientError):
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or error.response.get("Error", {}).get("Code") in _TRANSIENT_AWS_CODES
    return False


def is_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """``retry_condition_fn`` for tasks that talk to S3 or SageMaker."""
    try:
        state.result()
    except Exception as error:  # the task's own failure, re-raised by result(): classify it
        return is_transient_error(error)
    return False
