"""Training jobs: what to run (:class:`TrainingJobSpec`), what came of it (:class:`TrainingJob`), and the backend seam.

Jobs lay out their results like SageMaker's, on every backend::

    {output_uri}/{name}/output/model.tar.gz     model dir packed (files at the archive root)
    {output_uri}/{name}/output/output.tar.gz    SM_OUTPUT_DATA_DIR packed (history, profiler trace + summary)
    {output_uri}/{name}/debug-output/...        smdebug tensors, when the debugger is on
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from bincount.contracts.naming import check_name

LogSink = Callable[[str], None]
StopCheck = Callable[[list[dict[str, float]]], bool]
"""Given the epochs' metrics so far, True stops the job early (status ``Stopped``)."""

LOG_TAIL_LINES = 60
"""How many of a job's last log lines its record keeps (for failure messages)."""

DEBUGGER_RULES: dict[str, dict[str, float]] = {
    # rule -> thresholds, the same for the local checks and SageMaker's built-in rules
    "loss_not_decreasing": {"num_steps": 10, "diff_percent": 0.1},
    # eval loss 50% above train loss: a small data set's ordinary generalization gap (10-30% on the demo) passes
    "overfit": {"ratio_threshold": 0.5, "patience": 1},
    "overtraining": {"patience_validation": 3, "delta": 0.01},
    "vanishing_gradient": {"threshold": 1e-7},
    "poor_weight_initialization": {"threshold": 10.0, "distribution_range": 0.001},
}

RuleStatus = Literal["passed", "fired", "not_evaluated", "error"]


@dataclass(frozen=True)
class TrainingJobSpec:
    """A training job to run: ``channels`` maps ``train``/``valid``/``test`` to channel URIs.

    ``local_cpus`` is the local backend's share of this machine's cores for the job (when jobs run
    side by side), and ``local_processes`` how many data-parallel processes it starts for the job
    (``torchrun --nproc_per_node``); SageMaker gives each job its own instances, one process per GPU,
    and ignores both.
    """

    name: str
    hyperparameters: dict[str, Any]
    channels: dict[str, str]
    output_uri: str
    debugger: bool = False
    profiler: bool = False
    local_cpus: int | None = None
    local_processes: int = 1

    def __post_init__(self) -> None:
        check_name(self.name, "training")
        if self.local_processes < 1:
            raise ValueError(f"local_processes is {self.local_processes}: a job runs at least one process")

    def script_hyperparameters(self) -> dict[str, Any]:
        """What train.py gets as flags: the hyperparameters plus its ``--debugger`` / ``--profile`` switches."""
        return {
            **self.hyperparameters,
            **({"debugger": True} if self.debugger else {}),
            **({"profile": True} if self.profiler else {}),
        }


@dataclass(frozen=True)
class JobCost:
    """What a job used, and what it cost where a price is known.

    On SageMaker ``billed_s`` is BillableTimeInSeconds times the instances (spot: what was billed) and
    ``usd`` that at the price table's hourly rate, ``on_demand_usd`` the same job at on-demand rates
    (TrainingTimeInSeconds): their difference is the spot saving. Locally ``billed_s`` is the CPU seconds
    of the job's processes and there is no price.
    """

    billed_s: float
    unit: Literal["instance-seconds", "cpu-seconds"]
    instance_type: str | None = None
    instance_count: int = 1
    usd: float | None = None
    on_demand_usd: float | None = None
    price_source: str | None = None
    jobs: int = 1  # a tuning job's cost sums its trials' jobs

    def summary(self) -> str:
        """One line for a run summary, e.g. ``"$0.12 (1 x ml.g5.xlarge, 310 s billed; spot saved $0.25)"``."""
        over = f" over {self.jobs} jobs" if self.jobs > 1 else ""
        if self.unit == "cpu-seconds":
            return f"{self.billed_s / 60:.1f} CPU minutes (local{over})"
        used = f"{self.instance_count} x {self.instance_type}, {self.billed_s:.0f} instance-s billed{over}"
        if self.usd is None:
            return f"{used}; no price for {self.instance_type} in the price table"
        saved = (self.on_demand_usd or 0.0) - self.usd
        return f"${self.usd:.2f} ({used}" + (f"; spot saved ${saved:.2f})" if saved > 0.005 else ")")

    @classmethod
    def total(cls, costs: list[JobCost]) -> JobCost | None:
        """The sum of several jobs' costs (a tuning job's trials), priced only if every one of them is; None for none.

        Raises:
            ValueError: the jobs ran on different instance types or units (their sum would say one type).
        """
        if not costs:
            return None
        first = costs[0]
        if any(
            (c.unit, c.instance_type, c.instance_count) != (first.unit, first.instance_type, first.instance_count)
            for c in costs
        ):
            raise ValueError("jobs on different instances or units cannot be summed into one cost: sum them by type")
        priced = all(c.usd is not None for c in costs)
        return cls(
            billed_s=sum(c.billed_s for c in costs),
            unit=first.unit,
            instance_type=first.instance_type,
            instance_count=first.instance_count,
            usd=round(sum(c.usd or 0.0 for c in costs), 4) if priced else None,
            on_demand_usd=round(sum(c.on_demand_usd or 0.0 for c in costs), 4) if priced else None,
            price_source=first.price_source,
            jobs=sum(c.jobs for c in costs),
        )


@dataclass(frozen=True)
class EndpointCost:
    """What a SageMaker endpoint has cost since its current config went in service: ``instances`` x ``hours`` x the
    price table's hourly rate (``usd`` None where the table has no price). A serverless endpoint bills per request's
    compute, which only the bill (Cost Explorer by tag) says: ``instance_type`` None, no hours."""

    endpoint: str
    instance_type: str | None
    instances: int
    since: str
    hours: float
    usd: float | None = None
    price_source: str | None = None

    def summary(self) -> str:
        """One line, e.g. ``"$0.35 (1 x ml.m5.large for 3.0 h since 2026-12-07T18:00:00+00:00)"``."""
        if self.instance_type is None:
            return f"serverless since {self.since}: billed per request's compute time (Cost Explorer by tag)"
        used = f"{self.instances} x {self.instance_type} for {self.hours:.1f} h since {self.since}"
        if self.usd is None:
            return f"{used}; no price for {self.instance_type} in the price table"
        return f"${self.usd:.2f} ({used})"


@dataclass
class TrainingJob:
    """What a finished (or stopped) job left: status ``Completed``, ``Stopped`` or ``Failed``."""

    name: str
    status: str
    hyperparameters: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    metric_history: list[dict[str, float]] = field(default_factory=list)
    model_uri: str | None = None
    output_uri: str | None = None
    debug_output_uri: str | None = None
    failure_reason: str | None = None
    log_tail: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    cost: JobCost | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingJobFailed(RuntimeError):
    """A training job failed; ``job`` holds its record (reason and the tail of its log)."""

    def __init__(self, job: TrainingJob) -> None:
        tail = "\n".join(job.log_tail[-20:])
        super().__init__(f"training job {job.name} failed: {job.failure_reason}\n--- last log lines ---\n{tail}")
        self.job = job


@dataclass
class RuleResult:
    """A debugger rule's verdict; ``processing_job_arn`` is SageMaker's rule job (None locally)."""

    rule: str
    status: RuleStatus  # error: SageMaker's rule job itself failed
    evidence: str
    processing_job_arn: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingBackend(Protocol):
    def train(
        self, spec: TrainingJobSpec, on_log: LogSink | None = None, should_stop: StopCheck | None = None
    ) -> TrainingJob:
        """Run a training job to its end; raise :class:`TrainingJobFailed` if it fails."""
        ...

    def rule_results(self, job: TrainingJob, on_event: LogSink | None = None) -> list[RuleResult]:
        """The debugger rules' verdicts on ``job`` (run with ``debugger=True``), named alike on every backend."""
        ...
