"""Tasks: run a training job, check its debugger rules, summarize its profile."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from bincount.config import Settings
from bincount.contracts.training import RuleResult, TrainingJob, TrainingJobSpec
from bincount.factory import get_training_backend
from bincount.models import read_from_archive
from bincount.plots import training_curves
from bincount.storage import storage_for
from tasks.artifacts import markdown_table, publish_plot
from tasks.caching import TRAINING_JOB_CACHE
from tasks.retry import is_transient

TRAINING_SLOTS = "bincount-training"
"""Global concurrency limit every training job holds a slot of, so parallel trials and nightly runs
cannot overload the machine or the account. Created with one slot on first use;
``python -m deployments.setup --training-slots N`` sets another size."""


def ensure_concurrency_limit(name: str, slots: int = 1) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` unless it exists (any size it has is kept)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))


SLOT_WAIT_WARNING_S = 120.0
"""How long a training waits for its slot between two warnings that say what holds it and how to free it."""


@contextmanager
def training_slot() -> Iterator[None]:
    """Hold one slot of :data:`TRAINING_SLOTS` (strict: the limit is always there, so it always holds).

    A wait past :data:`SLOT_WAIT_WARNING_S` is logged, again each time, with the slots taken and the command that
    frees a leaked one: a process killed while training (SIGTERM, SIGKILL) keeps its slot taken when its lease
    died with the server that held it (Prefect's temporary server keeps leases in memory), and every later
    training would wait for it silently.
    """
    ensure_concurrency_limit(TRAINING_SLOTS)
    held = ExitStack()
    waited = 0.0
    while True:
        try:
            held.enter_context(concurrency(TRAINING_SLOTS, occupy=1, strict=True, timeout_seconds=SLOT_WAIT_WARNING_S))
            break
        except TimeoutError:
            waited += SLOT_WAIT_WARNING_S
            with get_client(sync_client=True) as client:
                limit = client.read_global_concurrency_limit_by_name(TRAINING_SLOTS)
            get_run_logger().warning(
                "Waited %.0f s for a training slot: %d of %d of the global concurrency limit %r are taken. Another "
                "training holds it; if none runs (a training process was killed and its slot leaked), free it: "
                "prefect global-concurrency-limit update %s --active-slots 0",
                waited,
                limit.active_slots,
                limit.limit,
                TRAINING_SLOTS,
                TRAINING_SLOTS,
            )
    with held:
        yield


CHATTER = re.compile(
    r"^\[[^]]{0,60} (?:INFO|DEBUG) [\w.]+:\d+\]"  # smdebug's own INFO lines
    r"|^[A-Z]+:?\d{4}[-\d]* [\d:.]+ \d+:\d+ "
    r"\w+\.cpp:\d+\]"  # kineto (torch.profiler): USDT profiler_start, gpuGetDeviceCount
    r"|^\[[WI]\d{4} [^]]*\.cpp:\d+\]"  # c10 warnings (CPUAllocator: memory allocated before profiling started)
    r"|UserWarning: Warning: Profiler clears events|^\s+_warn_once\("
)
"""A job's log lines that are its tools' chatter, not its story: logged at DEBUG."""


def log_line(logger: logging.LoggerAdapter | logging.Logger):
    """A sink for a job's log: its lines at INFO, the tools' chatter (:data:`CHATTER`) at DEBUG, blank lines dropped."""

    def sink(line: str) -> None:
        if line.strip():
            logger.log(logging.DEBUG if CHATTER.search(line) else logging.INFO, line)

    return sink


@task(
    name="run-training-job",
    retries=2,
    retry_delay_seconds=[30, 120],
    retry_condition_fn=is_transient,
    cache_policy=TRAINING_JOB_CACHE,
    persist_result=True,
)
def train_model_task(settings: Settings, spec: TrainingJobSpec) -> TrainingJob:
    """Run a training job to its end; publish its training curves (artifact ``training-curves``)."""
    logger = get_run_logger()
    logger.info("Training %s with %s on %s", spec.name, spec.hyperparameters, sorted(spec.channels))
    with training_slot():
        job = get_training_backend(settings).train(spec, on_log=log_line(logger))
    logger.info("%s %s: %s -> %s", job.name, job.status, job.metrics, job.model_uri)
    if job.metric_history:
        publish_plot("training-curves", training_curves(job.metric_history, job.name), f"Training curves: {job.name}")
    return job


@task(
    name="check-debugger-rules",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=is_transient,
    cache_policy=NO_CACHE,
)
def check_debugger_rules_task(settings: Settings, job: TrainingJob) -> list[RuleResult]:
    """The debugger rules' verdicts on a job; a table artifact ``debugger-rules``.

    On profile ``aws`` they are SageMaker's own (its built-in rules ran beside the job: this waits
    for them); locally the same checks run here on the job's smdebug output.
    """
    logger = get_run_logger()
    logger.info("Debugger rules on %s (profile %s)", job.name, settings.profile)
    results = get_training_backend(settings).rule_results(job, on_event=logger.info)
    for result in results:
        level = logging.WARNING if result.status in ("fired", "error") else logging.INFO
        logger.log(level, "%s %s: %s", result.rule, result.status, result.evidence)
    fired, errors = (sum(r.status == status for r in results) for status in ("fired", "error"))
    verdicts = {
        "fired": "⚠️ **FIRED**",
        "error": "❌ **could not run**",
        "passed": "✅ passed",
        "not_evaluated": "not evaluated",
    }
    summary = f"{fired} fired" + (f", {errors} could not run" if errors else "")
    headers = ["rule", "verdict", "evidence"]
    rows = [[r.rule, verdicts[r.status], r.evidence] for r in results]
    if any(r.processing_job_arn for r in results):  # SageMaker's rules ran as processing jobs: say which
        headers.append("processing job")
        rows = [[*row, r.processing_job_arn or "-"] for row, r in zip(rows, results, strict=True)]
    create_markdown_artifact(
        key="debugger-rules",
        markdown=f"### Debugger rules on {job.name}: {summary}\n\n" + markdown_table(headers, rows),
        description=f"Debugger rules on {job.name}: {summary}",
    )
    return results


@task(
    name="summarize-profile", retries=2, retry_delay_seconds=10, retry_condition_fn=is_transient, cache_policy=NO_CACHE
)
def summarize_profile_task(settings: Settings, job: TrainingJob) -> dict:
    """Read a job's profiler summary; a markdown artifact ``profiler-summary``."""
    logger = get_run_logger()
    if not job.output_uri:
        raise ValueError(f"job {job.name} has no output archive")
    logger.info("Reading the profiler summary of %s", job.name)
    summary = json.loads(read_from_archive(storage_for(settings), job.output_uri, "profiler_summary.json"))
    step = summary["step_time_ms"]
    memory = summary["peak_memory_mb"]
    rows = "\n".join(
        f"| `{op['name']}` | {op['calls']} | {op['self_time_ms']:.1f} | {100 * op['share']:.1f}% |"
        for op in summary["top_operators"]
    )
    cuda = f", CUDA allocated {memory['cuda_allocated']:.0f} MB" if memory.get("cuda_allocated") else ""
    create_markdown_artifact(
        key="profiler-summary",
        markdown=(
            f"### Profile of {job.name} ({summary['device']})\n\n"
            f"- step time: mean {step['mean']:.1f} ms, p50 {step['p50']:.1f} ms, p90 {step['p90']:.1f} ms over "
            f"{summary['steps']} steps\n"
            f"- waiting for data: {100 * summary['data_wait_share']:.1f}% of step time\n"
            f"- peak memory: process RSS {memory['process_rss']:.0f} MB{cuda}\n"
            f"- TensorBoard trace: `profiler/` inside {job.output_uri} (`tensorboard --logdir profiler`)\n\n"
            f"| operator | calls | self time (ms) | share |\n|---|---|---|---|\n{rows}\n"
        ),
        description=f"Profiler summary of {job.name}",
    )
    return summary
