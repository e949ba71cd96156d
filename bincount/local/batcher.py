"""Dynamic micro-batching: concurrent requests share one model forward, one forward at a time.

One worker thread owns the model. It takes whatever requests are queued, up to
``max_batch_size`` images, and waits at most ``max_wait_s`` for more only while other requests
are already on their way (accepted and being decoded): a lone client pays no wait at all.
While a forward runs, new requests queue up and go together in the next one.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_model_thread(threads: int | None = None) -> None:
    """Call first in a thread that will run the model, before its first torch op.

    Denormal flushing is a per-thread flag, and torch's worker threads copy it from the thread that
    starts them; measured here, a forward run on a thread set up this way takes ~100 ms of CPU per
    ResNet-50 image where the same forward on the main thread took ~1700 ms.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


@dataclass
class _Pending:
    pixels: torch.Tensor
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class MicroBatcher:
    """Feed pixel tensors ``[n, 3, S, S]`` to ``forward`` in batches; answer each caller its slice."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], list[Any]],
        max_batch_size: int = 8,
        max_wait_s: float = 0.005,
        threads: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._threads = threads
        self._queue: deque[_Pending] = deque()
        self._incoming = 0  # requests accepted and still decoding: worth a short wait
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="model-forward", daemon=True)
        self.batches = 0
        self.images = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then end the worker."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join()

    def expect(self) -> None:
        """A request has arrived and will submit soon (call :meth:`unexpect` if it fails first)."""
        with self._condition:
            self._incoming += 1

    def unexpect(self) -> None:
        with self._condition:
            self._incoming -= 1
            self._condition.notify_all()

    async def submit(self, pixels: torch.Tensor) -> list[Any]:
        """Queue ``pixels`` (after :meth:`expect`) and wait for their predictions."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._condition:
            self._incoming -= 1
            self._queue.append(_Pending(pixels, future, loop))
            self._condition.notify_all()
        return await future

    def _take_batch(self) -> list[_Pending]:
        with self._condition:
            while not self._queue:
                if self._stopping:
                    return []
                self._condition.wait()
            batch, size = [], 0
            deadline = time.monotonic() + self.max_wait_s
            while True:
                while self._queue and (not batch or size + len(self._queue[0].pixels) <= self.max_batch_size):
                    item = self._queue.popleft()
                    batch.append(item)
                    size += len(item.pixels)
                remaining = deadline - time.monotonic()
                if size >= self.max_batch_size or self._queue or self._incoming <= 0 or remaining <= 0:
                    return batch
                self._condition.wait(remaining)

    def _run(self) -> None:
        prepare_model_thread(self._threads)
        while batch := self._take_batch():
            try:
                results = self._forward(torch.cat([item.pixels for item in batch]))
            except Exception as error:  # answered to every caller of this batch; the worker lives on
                for item in batch:
                    item.loop.call_soon_threadsafe(_set_exception, item.future, error)
                continue
            self.batches += 1
            self.images += len(results)
            start = 0
            for item in batch:
                part = results[start : start + len(item.pixels)]
                start += len(item.pixels)
                item.loop.call_soon_threadsafe(_set_result, item.future, part)


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():  # the caller may have gone (client disconnected, request cancelled)
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
