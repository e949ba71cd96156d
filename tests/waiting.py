"""The one way tests wait: poll a condition until it holds or a deadline passes (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], *, timeout_s: float = 30.0, interval_s: float = 0.1, what: str = "") -> T:
    """Call ``condition`` until it returns something truthy and return that; fail the test after ``timeout_s``.

    ``what`` names the condition in the failure message (e.g. "the canary to roll back").
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what or condition!r}")
        time.sleep(interval_s)
