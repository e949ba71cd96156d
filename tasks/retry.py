"""Which failures a task retries: only transient storage errors; bad input fails at once."""

from __future__ import annotations

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from bincount.storage import TransientStorageError


def is_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """``retry_condition_fn`` for tasks that talk to S3."""
    try:
        state.result()
    except TransientStorageError:
        return True
    except Exception:  # any other failure is bad input or a bug: retrying cannot fix it
        return False
    return False
