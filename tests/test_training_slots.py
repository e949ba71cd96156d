"""The training concurrency limit holds without any setup step: created on first use, two jobs never overlap."""

from __future__ import annotations

import contextlib
import time

from prefect import flow, get_client, task
from prefect.exceptions import ObjectNotFound

from tasks.train import TRAINING_SLOTS, training_slot


@task
def hold_a_training_slot(seconds: float) -> tuple[float, float]:
    with training_slot():
        started = time.monotonic()
        time.sleep(seconds)
        return started, time.monotonic()


@flow
def two_trainings_at_once() -> list[tuple[float, float]]:
    futures = [hold_a_training_slot.submit(1.0) for _ in range(2)]
    return [future.result() for future in futures]


def test_two_trainings_never_overlap_and_the_limit_needs_no_setup(prefect_server: None) -> None:
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):  # as nobody set up
        client.delete_global_concurrency_limit_by_name(TRAINING_SLOTS)
    (_first_start, first_end), (second_start, _second_end) = sorted(two_trainings_at_once())
    assert second_start >= first_end, "the second training started while the first still held the slot"
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(TRAINING_SLOTS).limit == 1
