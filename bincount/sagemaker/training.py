"""The SageMaker training backend: one PyTorch Estimator job per :class:`TrainingJobSpec`.

The job runs ``sm_scripts/train.py`` (``source_dir=sm_scripts``) with the spec's hyperparameters,
named exactly like train.py's flags, and the shared metric definitions.

Debugger and profiler need no SageMaker service by default (SageMaker Debugger closed to new customers
on 2026-07-30): the request carries no DebugHookConfig, no rules and only the ProfilerConfig that turns
SageMaker's monitoring off. With ``spec.debugger`` train.py's own smdebug hook writes its tensors to
:data:`JOB_TENSORS_DIR`, inside ``SM_OUTPUT_DATA_DIR``, so SageMaker packs them into the job's
``output.tar.gz`` beside the ``torch.profiler`` trace and summary (``spec.profiler``); after the job,
:meth:`SageMakerTrainingBackend.rule_results` runs the project's own rules
(:mod:`bincount.debugger_rules`, as the local backend does) on that archive.

With the option ``sagemaker_debugger`` (for accounts that still have the service) ``spec.debugger`` adds
a DebuggerHookConfig (losses, gradients, weights) and the five built-in rules, whose verdicts SageMaker
gives, and ``spec.profiler`` a ProfilerConfig for system monitoring.

The job is named ``spec.name``: a retried task that finds a job of that name follows it instead
of starting another (see :func:`bincount.contracts.naming.job_name`). Results lie where the local
backend puts them (:mod:`bincount.contracts.training`), because SageMaker itself lays them out that way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from bincount.code import SM_SCRIPTS_DIR, TRAIN_ENTRY_POINT
from bincount.contracts.naming import check_name
from bincount.contracts.training import (
    DEBUGGER_RULES,
    JobCost,
    LogSink,
    RuleResult,
    StopCheck,
    TrainingJob,
    TrainingJobFailed,
    TrainingJobSpec,
)
from bincount.debugger_rules import ARCHIVE_TENSORS, check_archive_rules
from bincount.sagemaker.session import SageMakerBackendBase, require_s3, resource_tags
from bincount.sagemaker.waiting import (
    TRAINING_JOB,
    TRAINING_LOG_GROUP,
    LogFollower,
    describe_or_none,
    poll_until,
    wait_for,
)
from bincount.storage import join_uri, storage_for
from sm_scripts.metric_format import METRIC_DEFINITIONS

logger = logging.getLogger(__name__)

JOB_TENSORS_DIR = f"/opt/ml/output/data/{ARCHIVE_TENSORS}"
"""Where train.py's smdebug hook writes in a job without the Debugger service: inside ``SM_OUTPUT_DATA_DIR``,
which SageMaker packs into ``output.tar.gz``."""
PRICES = Path(__file__).with_name("prices.json")
PRICES_ENV = "BINCOUNT_SAGEMAKER_PRICES"
RULE_VERDICTS = {"NoIssuesFound": "passed", "IssuesFound": "fired", "Error": "error"}
RULES_RUNNING = frozenset({"InProgress", "Stopping"})


def collection_configs(save_interval: int) -> list[Any]:
    """Losses every step; gradients and weights every ``save_interval`` steps."""
    from sagemaker.debugger import CollectionConfig

    return [
        CollectionConfig("losses", parameters={"save_interval": "1"}),
        CollectionConfig("gradients", parameters={"save_interval": str(save_interval)}),
        CollectionConfig("weights", parameters={"save_interval": str(save_interval)}),
    ]


def built_in_rules(collections: list[Any]) -> list[Any]:
    """The five built-in rules; where a rule wants one of our collections it gets ours (one config per name)."""
    from sagemaker.debugger import CollectionConfig, Rule, rule_configs

    ours = {config.name: config for config in collections}
    rules = []
    for name, thresholds in DEBUGGER_RULES.items():
        parameters = {key: str(value) for key, value in thresholds.items()}
        base = getattr(rule_configs, name)()
        wanted = [
            ours.get(
                item["CollectionName"],
                CollectionConfig(item["CollectionName"], parameters=item.get("CollectionParameters")),
            )
            for item in base.get("CollectionConfigurations", [])
        ]
        rules.append(Rule.sagemaker(base, rule_parameters=parameters, collections_to_save=wanted))
    return rules


def price_table() -> dict[str, Any]:
    """The dated table of hourly instance prices: ``$BINCOUNT_SAGEMAKER_PRICES`` (a JSON file of the same shape)
    where set, else the one in this package (``prices.json``: its ``source`` says where and when it is from)."""
    path = Path(os.environ.get(PRICES_ENV) or PRICES)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        problem = f"{PRICES_ENV}={path} is not a readable JSON price table ({error}): fix or unset it"
        raise ValueError(problem) from error


def job_cost(description: dict[str, Any], prices: dict[str, Any]) -> JobCost:
    """What a finished training job was billed (DescribeTrainingJob), priced with ``prices``."""
    resources = description.get("ResourceConfig", {})
    instance_type, count = resources.get("InstanceType"), int(resources.get("InstanceCount", 1))
    trained_s = float(description.get("TrainingTimeInSeconds", 0))
    billed_s = float(description.get("BillableTimeInSeconds", trained_s)) * count
    hourly = prices.get("per_instance_hour", {}).get(instance_type)
    return JobCost(
        billed_s=billed_s,
        unit="instance-seconds",
        instance_type=instance_type,
        instance_count=count,
        usd=None if hourly is None else round(billed_s / 3600 * hourly, 4),
        on_demand_usd=None if hourly is None else round(trained_s * count / 3600 * hourly, 4),
        price_source=prices.get("source"),
    )


def job_record(description: dict[str, Any], hyperparameters: dict[str, Any]) -> TrainingJob:
    """A :class:`TrainingJob` from DescribeTrainingJob."""
    name = description["TrainingJobName"]
    output = description["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    debug = description.get("DebugHookConfig")
    return TrainingJob(
        name=name,
        status=description["TrainingJobStatus"],
        hyperparameters=hyperparameters,
        metrics={m["MetricName"]: float(m["Value"]) for m in description.get("FinalMetricDataList", [])},
        model_uri=description.get("ModelArtifacts", {}).get("S3ModelArtifacts"),
        output_uri=join_uri(output, name, "output", "output.tar.gz"),
        debug_output_uri=join_uri(debug["S3OutputPath"], name, "debug-output") if debug else None,
        failure_reason=description.get("FailureReason") or None,
        log_tail=[
            f"{t['Status']}: {t.get('StatusMessage', '')}" for t in description.get("SecondaryStatusTransitions", [])
        ],
        duration_s=float(description.get("TrainingTimeInSeconds", 0)),
        cost=job_cost(description, price_table()) if "BillableTimeInSeconds" in description else None,
    )


class SageMakerTrainingBackend(SageMakerBackendBase):
    """Runs each :class:`TrainingJobSpec` as a SageMaker training job and follows it to its end."""

    def estimator(self, spec: TrainingJobSpec, hyperparameters: dict[str, Any] | None = None) -> Any:
        """The PyTorch Estimator for ``spec`` (also the tuner's template, with ``hyperparameters`` static)."""
        from sagemaker.debugger import DebuggerHookConfig, ProfilerConfig
        from sagemaker.pytorch import PyTorch

        output = require_s3(spec.output_uri, "output URI")
        options = self.options
        extra: dict[str, Any] = {}
        flags: dict[str, Any] = {}  # train.py flags that are places and intervals, not hyperparameters of the record
        if spec.debugger and options.sagemaker_debugger:
            collections = collection_configs(options.debugger_save_interval)
            extra["debugger_hook_config"] = DebuggerHookConfig(s3_output_path=output, collection_configs=collections)
            extra["rules"] = built_in_rules(collections)
        else:
            extra["debugger_hook_config"] = False  # the SDK would add a default hook otherwise
            if spec.debugger:  # train.py's own hook, into the job's output.tar.gz
                flags = {"debugger-dir": JOB_TENSORS_DIR, "debugger-save-interval": options.debugger_save_interval}
        if spec.profiler and options.sagemaker_debugger:
            extra["profiler_config"] = ProfilerConfig(
                s3_output_path=output, system_monitor_interval_millis=options.system_monitor_interval_ms
            )
        else:
            extra["disable_profiler"] = True  # the SDK would turn SageMaker's system monitoring on otherwise
        if self.devices_per_job() > 1:
            # Data-parallel: torchrun on every instance, one train.py process per GPU (see sm_scripts/distributed.py).
            extra["distribution"] = {"torch_distributed": {"enabled": True}}
        if options.use_spot:
            extra.update(
                use_spot_instances=True,
                max_wait=max(options.max_wait_s, options.max_run_s),
                checkpoint_s3_uri=join_uri(output, spec.name, "checkpoints"),
            )
            if hyperparameters is None:  # one job resumes from it (a tuner's trials would share one URI)
                flags["checkpoint-dir"] = "/opt/ml/checkpoints"
        if hyperparameters is None:
            hyperparameters = {**spec.script_hyperparameters(), **flags}
        return PyTorch(
            entry_point=TRAIN_ENTRY_POINT,
            source_dir=str(SM_SCRIPTS_DIR),
            role=options.require_role(),
            framework_version=options.framework_version,
            py_version=options.py_version,
            instance_type=options.train_instance_type,
            instance_count=options.train_instance_count,
            volume_size=options.volume_size_gb,
            max_run=options.max_run_s,
            input_mode="FastFile",  # train.py reads each photo once, by path, into its cache: no copy before the start
            hyperparameters=hyperparameters,
            metric_definitions=METRIC_DEFINITIONS,
            output_path=output,
            code_location=output,
            sagemaker_session=self.session,
            tags=resource_tags(),
            **extra,
        )

    def devices_per_job(self) -> int:
        """The GPUs of a training job in all: instances x GPUs each (ml.p* and ml.g* types have GPUs; how many,
        the SDK's table says, one where it does not list the type).

        Raises:
            ValueError: several instances of a type without GPUs: SageMaker's torchrun launcher needs GPUs,
                and without it the instances would each train alone.
        """
        from sagemaker import instance_types_gpu_info

        options = self.options
        family = options.train_instance_type.removeprefix("ml.").split(".")[0]
        gpus = 0
        if family.startswith(("p", "g")):
            table = instance_types_gpu_info.retrieve(self.session.boto_region_name)
            gpus = table.get(options.train_instance_type, {}).get("Count", 1)
        if gpus == 0 and options.train_instance_count > 1:
            raise ValueError(
                f"train_instance_count {options.train_instance_count} of {options.train_instance_type}, which has "
                "no GPU: data-parallel training on SageMaker (torch_distributed) runs on GPU instances. Use one "
                "instance, or a GPU type such as ml.g5.12xlarge."
            )
        return options.train_instance_count * max(gpus, 1)

    def channels(self, spec: TrainingJobSpec) -> dict[str, str]:
        """Channel name -> S3 prefix (with a trailing slash, so ``train`` never matches ``train2/``)."""
        return {name: require_s3(uri, f"channel {name!r}") + "/" for name, uri in spec.channels.items()}

    def train(
        self, spec: TrainingJobSpec, on_log: LogSink | None = None, should_stop: StopCheck | None = None
    ) -> TrainingJob:
        """Start ``spec.name`` (or follow it, if a previous attempt started it) and wait for its end.

        ``should_stop`` is not consulted: SageMaker reports metrics after the job, and a tuning
        job's early stopping is SageMaker's own (``TrainingJobEarlyStoppingType``).

        Raises:
            TrainingJobFailed: the job failed; the record holds SageMaker's FailureReason.
            SageMakerWaitTimeout: the job outlived ``job_timeout_s`` and was asked to stop.
        """
        sink: LogSink = on_log or (lambda line: logger.info("%s", line))
        check_name(spec.name, "training")
        client = self.session.sagemaker_client
        hyperparameters = spec.script_hyperparameters()
        if describe_or_none(client, TRAINING_JOB, spec.name) is not None:
            sink(f"training job {spec.name} exists (an earlier attempt started it): following it")
        else:
            sink(
                f"starting training job {spec.name} on {self.options.train_instance_count} x "
                f"{self.options.train_instance_type}"
            )
            try:
                self.estimator(spec).fit(self.channels(spec), job_name=spec.name, wait=False)
            except ClientError as error:
                if (
                    error.response.get("Error", {}).get("Code") not in ("ResourceInUse", "ValidationException")
                    or describe_or_none(client, TRAINING_JOB, spec.name) is None
                ):
                    raise
                sink(f"training job {spec.name} was created by a concurrent attempt: following it")
        logs = LogFollower(self.logs_client, TRAINING_LOG_GROUP, spec.name, sink)
        description = wait_for(
            client,
            TRAINING_JOB,
            spec.name,
            on_event=sink,
            timeout_s=self.options.job_timeout_s,
            backoff=self.backoff(),
            logs=logs,
        )
        job = job_record(description, hyperparameters)
        if job.status == "Failed":
            job.log_tail = list(logs.tail) or [
                f"(no CloudWatch log lines for {spec.name}: {logs.problem or 'none were logged'})"
            ]
            raise TrainingJobFailed(job)
        cost = f" ({job.cost.summary()})" if job.cost else ""
        sink(f"training job {spec.name} {job.status.lower()} in {job.duration_s:.0f} s{cost}: {job.metrics}")
        return job

    def rule_results(
        self,
        job: TrainingJob,
        on_event: LogSink | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> list[RuleResult]:
        """The debugger rules' verdicts on ``job``: the project's own, or the Debugger service's.

        A job run without the service (the default) saved its tensors in its ``output.tar.gz``: the
        project's rules (:func:`bincount.debugger_rules.check_archive_rules`, the local backend's checks)
        run here on it. A job run with ``sagemaker_debugger`` has a ``debug_output_uri`` and SageMaker's
        verdicts (:meth:`service_rule_results`).

        Raises:
            ValueError: the job saved no tensors (it ran without ``debugger=True``).
        """
        if job.debug_output_uri:
            return self.service_rule_results(job, on_event, sleep=sleep, clock=clock)
        if not job.output_uri:
            raise ValueError(f"job {job.name} ({job.status}) has no output.tar.gz to check: train it to completion")
        sink: LogSink = on_event or (lambda line: logger.info("%s", line))
        sink(f"checking the debugger rules on the tensors in {job.output_uri}")
        return check_archive_rules(storage_for(self.settings), job.output_uri, job.name)

    def service_rule_results(
        self,
        job: TrainingJob,
        on_event: LogSink | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> list[RuleResult]:
        """SageMaker's verdicts of the built-in rules on ``job``, once no rule is still running.

        The rules run in processing jobs of their own, during and after training. This polls
        DescribeTrainingJob's ``DebugRuleEvaluationStatuses`` with backoff for up to
        ``rules_timeout_s``, reporting each rule's status changes to ``on_event``. Verdicts are
        named like :func:`bincount.debugger_rules.check_rules`' (``loss_not_decreasing``), so the
        retrain task publishes either backend's in one artifact: ``passed`` (NoIssuesFound),
        ``fired`` (IssuesFound), ``error`` (the rule itself failed: no verdict) and
        ``not_evaluated`` (stopped, or still running at the timeout), each with SageMaker's
        StatusDetails as evidence and the rule's processing job.
        """
        sink: LogSink = on_event or (lambda line: logger.info("%s", line))
        client, job_name = self.session.sagemaker_client, job.name
        statuses: list[dict[str, Any]] = []
        reported: dict[str, str] = {}

        def rules_done() -> bool:
            nonlocal statuses
            statuses = client.describe_training_job(TrainingJobName=job_name).get("DebugRuleEvaluationStatuses", [])
            for status in statuses:
                rule, state = status["RuleConfigurationName"], status["RuleEvaluationStatus"]
                if reported.get(rule) != state:
                    details = f": {status['StatusDetails']}" if status.get("StatusDetails") else ""
                    sink(f"debugger rule {rule} of {job_name} is {state}{details}")
                    reported[rule] = state
            return not any(status["RuleEvaluationStatus"] in RULES_RUNNING for status in statuses)

        timeout = self.options.rules_timeout_s
        if not poll_until(rules_done, timeout_s=timeout, backoff=self.backoff(), sleep=sleep, clock=clock):
            running = [s["RuleConfigurationName"] for s in statuses if s["RuleEvaluationStatus"] in RULES_RUNNING]
            sink(
                f"debugger rules {', '.join(running)} of {job_name} still running after {timeout:.0f} s: reported as "
                "not evaluated (their verdicts arrive later: aws sagemaker describe-training-job "
                f"--training-job-name {job_name}; "
                "wait longer with BINCOUNT_SAGEMAKER_RULES_TIMEOUT_S)"
            )
        return [rule_verdict(status, timeout) for status in statuses]


def rule_verdict(status: dict[str, Any], timeout_s: float) -> RuleResult:
    """One DebugRuleEvaluationStatus as a :class:`RuleResult`."""
    state, details = status["RuleEvaluationStatus"], status.get("StatusDetails")
    if state in RULE_VERDICTS:
        verdict, evidence = RULE_VERDICTS[state], details or state
    elif state in RULES_RUNNING:
        verdict, evidence = (
            "not_evaluated",
            f"still {state} after {timeout_s:.0f} s" + (f": {details}" if details else ""),
        )
    else:  # Stopped: the rule was stopped before it reached a verdict
        verdict, evidence = "not_evaluated", f"{state}" + (f": {details}" if details else "")
    return RuleResult(
        rule=re.sub(r"(?<!^)(?=[A-Z])", "_", status["RuleConfigurationName"]).lower(),
        status=verdict,
        evidence=evidence,
        processing_job_arn=status.get("RuleEvaluationJobArn"),
    )
