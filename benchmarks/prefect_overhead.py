"""Prefect's overhead per task: a flow of no-op tasks against the same calls as plain functions.

Both run in this process against one Prefect server (a temporary one unless PREFECT_API_URL is
set); the plain calls are the baseline. Task runs are recorded in the server like any others.

    .venv/bin/python benchmarks/prefect_overhead.py --tasks 200
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, task
from prefect.cache_policies import NO_CACHE


def step(number: int) -> int:
    return number


step_task = task(step, name="no-op", cache_policy=NO_CACHE)


@flow(name="overhead-plain")
def plain_flow(count: int) -> int:
    return sum(step(number) for number in range(count))


@flow(name="overhead-tasks")
def task_flow(count: int) -> int:
    return sum(step_task(number) for number in range(count))


def timed(function, count: int) -> float:
    started = time.perf_counter()
    function(count)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, help="no-op tasks per flow (default: 200)")
    args = parser.parse_args()
    timed(plain_flow, 1)  # starts the server and warms both paths up
    timed(task_flow, 1)
    plain = timed(plain_flow, args.tasks)
    tasks = timed(task_flow, args.tasks)
    print(f"flow of {args.tasks} plain calls: {plain:.2f} s; flow of {args.tasks} no-op tasks: {tasks:.2f} s")
    print(
        f"Prefect overhead per task: {1000 * (tasks - plain) / args.tasks:.1f} ms "
        f"(ratio {tasks / plain:.1f}x the plain flow's wall time)"
    )


if __name__ == "__main__":
    main()
