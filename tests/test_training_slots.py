"""The training concurrency limit holds without any setup step: created on first use, two jobs never overlap."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import pytest
from prefect import flow, get_client, task
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound
from waiting import wait_until

import tasks.train
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


def test_a_leaked_slot_is_named_with_the_command_that_frees_it_while_the_training_waits(
    prefect_server: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A training process killed while it held its slot leaves the slot taken: the next one says so, not silence."""
    monkeypatch.setattr(tasks.train, "SLOT_WAIT_WARNING_S", 1.0)
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
        client.delete_global_concurrency_limit_by_name(TRAINING_SLOTS)
    tasks.train.ensure_concurrency_limit(TRAINING_SLOTS)
    with get_client(sync_client=True) as client:
        leaked = client.read_global_concurrency_limit_by_name(TRAINING_SLOTS)
        client.update_global_concurrency_limit(TRAINING_SLOTS, GlobalConcurrencyLimitUpdate(active_slots=1))

    def free_the_slot_once_warned() -> None:
        wait_until(lambda: "--active-slots 0" in caplog.text, timeout_s=60, what="the warning")
        with get_client(sync_client=True) as client:
            client.update_global_concurrency_limit(TRAINING_SLOTS, GlobalConcurrencyLimitUpdate(active_slots=0))

    freer = threading.Thread(target=free_the_slot_once_warned)
    freer.start()
    with caplog.at_level(logging.WARNING):
        started, ended = one_training()
    freer.join()
    assert ended >= started and leaked.limit == 1
    assert "1 of 1 of the global concurrency limit 'bincount-training' are taken" in caplog.text
    assert "prefect global-concurrency-limit update bincount-training --active-slots 0" in caplog.text


@flow
def one_training() -> tuple[float, float]:
    return hold_a_training_slot(0.1)
