"""The local training backend: ``sm_scripts/train.py`` as a subprocess, set up as SageMaker would.

The job gets SageMaker's layout in a scratch folder (``input/data/<channel>``, ``model``,
``output/data``, ``output/failure``), the ``SM_*`` variables pointing at it, and the hyperparameters
as ``--name value`` flags. Its log streams line by line to ``on_log``; metric lines are parsed with
the same regexes as SageMaker's metric definitions. The results are packed and put under the
job's output URI as SageMaker would (see :mod:`bincount.contracts.training`).

Data-parallel jobs (``spec.local_processes > 1``) run under ``torchrun --standalone --nproc_per_node N``;
the processes share the job's cores, and rank 0 alone prints metric lines and writes the model.

Checkpoints: train.py gets ``--checkpoint-dir``, a folder kept under the job's output URI
(``{output_uri}/{name}/checkpoints``, like SageMaker's ``checkpoint_s3_uri``), so another attempt
at the same job (a Prefect retry after a crash or a cancel) resumes after its last finished epoch.
A ``file://`` folder is used in place; an ``s3://`` one is staged here and each new checkpoint is
uploaded as train.py reports it. They are deleted once the job has completed or was stopped.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from bincount.code import SM_SCRIPTS_DIR, TRAIN_ENTRY_POINT
from bincount.config import Settings
from bincount.contracts.training import (
    LOG_TAIL_LINES,
    JobCost,
    LogSink,
    RuleResult,
    StopCheck,
    TrainingJob,
    TrainingJobFailed,
    TrainingJobSpec,
)
from bincount.debugger_rules import check_job_rules
from bincount.models import pack_folder
from bincount.storage import Storage, join_uri, storage_for
from sm_scripts.metric_format import parse_metrics

CHECKPOINT_SAVED = "checkpoint: epoch "  # how train.py's line after each checkpoint it saves begins
STOP_GRACE_S = 10.0

logger = logging.getLogger(__name__)


def hyperparameter_flags(hyperparameters: dict[str, Any]) -> list[str]:
    """``{"batch-size": 64}`` -> ``["--batch-size", "64"]``, as SageMaker's script mode passes them."""
    flags = []
    for name, value in hyperparameters.items():
        flags += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def sagemaker_environment(
    job_dir: Path, channels: dict[str, Path], hyperparameters: dict[str, Any], cpus: int | None = None
) -> dict[str, str]:
    """The ``SM_*`` variables of a one-host SageMaker training container, pointing into ``job_dir``.

    ``cpus`` is the job's share of this machine's cores (``SM_NUM_CPUS``; train.py uses that many threads).
    """
    import torch

    gpus = torch.cuda.device_count()
    hps = dict(hyperparameters.items())
    env = {
        "SM_MODEL_DIR": str(job_dir / "model"),
        "SM_OUTPUT_DIR": str(job_dir / "output"),
        "SM_OUTPUT_DATA_DIR": str(job_dir / "output" / "data"),
        "SM_INPUT_DIR": str(job_dir / "input"),
        "SM_INPUT_DATA_DIR": str(job_dir / "input" / "data"),
        "SM_INPUT_CONFIG_DIR": str(job_dir / "input" / "config"),
        "SM_CHANNELS": json.dumps(sorted(channels)),
        "SM_NUM_GPUS": str(gpus),
        "SM_NUM_CPUS": str(cpus or os.cpu_count() or 1),
        "SM_HOSTS": json.dumps(["algo-1"]),
        "SM_CURRENT_HOST": "algo-1",
        "SM_MODULE_DIR": str(SM_SCRIPTS_DIR),
        "SM_USER_ENTRY_POINT": TRAIN_ENTRY_POINT,
        "SM_HPS": json.dumps(hps),
        "SM_USER_ARGS": json.dumps(hyperparameter_flags(hyperparameters)),
    }
    for name, path in channels.items():
        env[f"SM_CHANNEL_{name.upper()}"] = str(path)
    for name, value in hyperparameters.items():
        env[f"SM_HP_{name.upper().replace('-', '_')}"] = str(value)
    return env


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (a cancelled flow run killed outright)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class LocalTrainingBackend:
    """Runs each job as ``python train.py <flags>`` in a scratch folder; one job per call."""

    def __init__(self, settings: Settings, storage: Storage | None = None, python: str = sys.executable) -> None:
        self.settings = settings
        self.storage = storage or storage_for(settings)
        self.python = python

    def rule_results(self, job: TrainingJob, on_event: LogSink | None = None) -> list[RuleResult]:
        """The checks that mean what SageMaker's built-in rules mean, run here on the job's smdebug output."""
        if not job.debug_output_uri:
            raise ValueError(f"job {job.name} saved no debugger output: run it with debugger=True")
        return check_job_rules(self.storage, job.debug_output_uri)

    def train(
        self, spec: TrainingJobSpec, on_log: LogSink | None = None, should_stop: StopCheck | None = None
    ) -> TrainingJob:
        """Run ``spec`` to its end and return its record.

        Raises:
            TrainingJobFailed: the script exited non-zero; the record holds the reason and log tail.
        """
        sink = on_log or (lambda line: logger.info("%s: %s", spec.name, line))
        with tempfile.TemporaryDirectory(prefix=f"{spec.name}-") as scratch:
            job_dir = Path(scratch)
            channels = {
                name: self.storage.local_folder(uri, job_dir / "input" / "data" / name)
                for name, uri in spec.channels.items()
            }
            hyperparameters = spec.script_hyperparameters()
            for folder in ("model", "output/data", "input/config"):
                (job_dir / folder).mkdir(parents=True, exist_ok=True)
            checkpoint_uri = join_uri(spec.output_uri, spec.name, "checkpoints")
            checkpoints = self.storage.local_folder(checkpoint_uri, job_dir / "checkpoints")
            flags = {
                **hyperparameters,
                "checkpoint-dir": str(checkpoints),
            }  # a place, not a hyperparameter of the record
            environment = sagemaker_environment(job_dir, channels, flags, spec.local_cpus)
            env = {**os.environ, **environment, "PYTHONUNBUFFERED": "1"}
            launcher = [self.python]
            if spec.local_processes > 1:  # data-parallel: torchrun starts the processes and their rendezvous
                launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.local_processes}"]
            command = [*launcher, TRAIN_ENTRY_POINT, *hyperparameter_flags(flags)]
            sink(f"starting {spec.name}: {' '.join(command[1:])}")
            if not checkpoint_uri.startswith("file://"):
                sink = self._uploading_checkpoints(sink, checkpoints, checkpoint_uri)
            job = TrainingJob(name=spec.name, status="InProgress", hyperparameters=hyperparameters)
            started = time.monotonic()
            returncode = self._run(command, env, job, sink, should_stop)
            job.duration_s = round(time.monotonic() - started, 3)
            if job.status == "Stopped":
                self._delete_checkpoints(checkpoint_uri)
                sink(f"{spec.name} stopped early after {len(job.metric_history)} epochs")
                return job
            if returncode != 0:
                failure = job_dir / "output" / "failure"
                last = next((line for line in reversed(job.log_tail) if line.strip()), "no output")
                job.status = "Failed"
                job.failure_reason = (
                    failure.read_text().strip() if failure.is_file() else f"exit code {returncode}: {last}"
                )
                raise TrainingJobFailed(job)
            self._upload_results(spec, job_dir, job)
            self._delete_checkpoints(checkpoint_uri)
            job.status = "Completed"
            used = f", {job.cost.summary()}" if job.cost else ""
            sink(f"{spec.name} completed in {job.duration_s:.1f}s{used}: {job.metrics}")
            return job

    def _uploading_checkpoints(self, sink: LogSink, folder: Path, checkpoint_uri: str) -> LogSink:
        """``sink``, after an upload of ``folder`` each time train.py reports a new checkpoint (as SageMaker
        syncs them)."""

        def forward(line: str) -> None:
            if line.startswith(CHECKPOINT_SAVED):
                for path in sorted(folder.iterdir()):
                    if path.is_file() and not path.name.startswith(".tmp-"):  # a write in progress
                        self.storage.upload_file(path, join_uri(checkpoint_uri, path.name))
            sink(line)

        return forward

    def _delete_checkpoints(self, checkpoint_uri: str) -> None:
        """A finished job's checkpoints serve no resume; they are several copies of the weights."""
        for item in self.storage.list(checkpoint_uri):
            self.storage.delete(item.uri)

    def _run(
        self, command: list[str], env: dict[str, str], job: TrainingJob, sink: LogSink, should_stop: StopCheck | None
    ) -> int:
        """Stream the script's output; stop it when ``should_stop`` says so, or when we are interrupted."""
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        process = subprocess.Popen(
            command,
            cwd=SM_SCRIPTS_DIR,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                sink(line)
                metrics = parse_metrics(line)
                if "epoch" not in metrics:
                    continue
                if line.startswith("kept"):
                    job.metrics = metrics
                    continue
                job.metric_history.append(metrics)
                if should_stop is not None and should_stop(job.metric_history):
                    job.status = "Stopped"
                    job.metrics = metrics
                    self._terminate(process)
                    break
            if process.returncode is None:  # not stopped (reaped) above: wait, reading what it used
                _, status, usage = os.wait4(process.pid, 0)
                process.returncode = os.waitstatus_to_exitcode(status)
                job.cost = JobCost(billed_s=round(usage.ru_utime + usage.ru_stime, 3), unit="cpu-seconds")
            return process.returncode
        except BaseException:  # cancellation, KeyboardInterrupt or a failing callback: never leave it running
            self._terminate(process)
            raise
        finally:
            job.log_tail = list(tail)

    @staticmethod
    def _terminate(process: subprocess.Popen) -> None:
        if process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _upload_results(self, spec: TrainingJobSpec, job_dir: Path, job: TrainingJob) -> None:
        base = join_uri(spec.output_uri, spec.name)
        pack_folder(job_dir / "model", job_dir / "model.tar.gz")
        job.model_uri = join_uri(base, "output", "model.tar.gz")
        self.storage.upload_file(job_dir / "model.tar.gz", job.model_uri)
        pack_folder(job_dir / "output" / "data", job_dir / "output.tar.gz")
        job.output_uri = join_uri(base, "output", "output.tar.gz")
        self.storage.upload_file(job_dir / "output.tar.gz", job.output_uri)
        tensors = job_dir / "output" / "tensors"
        if spec.debugger and tensors.is_dir():
            job.debug_output_uri = join_uri(base, "debug-output")
            for path in sorted(tensors.rglob("*")):
                if path.is_file():
                    self.storage.upload_file(path, join_uri(job.debug_output_uri, str(path.relative_to(tensors))))
