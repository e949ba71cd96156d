"""SageMaker options and the one place sessions and clients are built.

Credentials come from the default AWS chain (environment, profile, the ECS task's or instance's
role), or from the ``BINCOUNT_SAGEMAKER_AWS_*`` / ``..._PROFILE_NAME`` options.

    options = SageMakerOptions.load(role_arn="arn:aws:iam::123456789012:role/bincount-sagemaker")
    session = sagemaker_session(settings, options)     # sagemaker.Session on the right endpoints

Every job, model, endpoint config and endpoint the backends create carries :func:`resource_tags`, so
Cost Explorer can sum what a project, a flow run or a model group cost (docs/AWS.md: Cost per run).
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from typing import Any, Literal

import boto3
import botocore.config
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bincount.config import Settings, SettingsError
from bincount.sagemaker.serverless import is_accelerated, serverless_config
from bincount.sagemaker.waiting import Backoff

RETRIES = botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 8})

PROJECT_TAG = "bincount"
FLOW_RUN_VARIABLES = ("BINCOUNT_FLOW_RUN_ID", "PREFECT__FLOW_RUN_ID")
"""Where the flow run that creates a resource is read from when the caller does not give it: a task may set the
first; Prefect's runner sets the second in the process of every flow run it starts from a deployment."""
_TAG_VALUE = re.compile(r"[^\w .:/=+\-@]")


def resource_tags(flow_run_id: str | None = None, **known: Any) -> list[dict[str, str]]:
    """SageMaker Tags for what this project creates: ``project=bincount``, ``flow-run-id`` (given, or from
    :data:`FLOW_RUN_VARIABLES`) and each of ``known`` that is not None (``model_group`` -> ``model-group``),
    values cut to what a tag holds (256 letters, digits, spaces and ``_.:/=+-@``).

    Example:
        ``resource_tags(model_group="bincount", model_version=3)`` ->
        ``[{"Key": "project", "Value": "bincount"}, {"Key": "model-group", ...}, {"Key": "model-version", ...}]``
    """
    run = flow_run_id or next((os.environ[name] for name in FLOW_RUN_VARIABLES if os.environ.get(name)), None)
    values = {"project": PROJECT_TAG, "flow-run-id": run, **{key.replace("_", "-"): v for key, v in known.items()}}
    return [
        {"Key": key, "Value": _TAG_VALUE.sub("_", str(value))[:256]}
        for key, value in values.items()
        if value is not None and str(value) != ""
    ]


def require_s3(uri: str, what: str) -> str:
    """``uri`` without a trailing slash, if it is on S3 (the only store SageMaker reads and writes)."""
    if not uri.startswith("s3://"):
        raise ValueError(
            f"{what} {uri} is not on S3: SageMaker reads and writes s3:// only "
            "(set BINCOUNT_ARTIFACT_ROOT=s3://<bucket>/bincount and upload the channels again)"
        )
    return uri.rstrip("/")


class SageMakerOptions(BaseSettings):
    """What the SageMaker backends need beyond :class:`~bincount.config.Settings` (env ``BINCOUNT_SAGEMAKER_*``)."""

    model_config = SettingsConfigDict(env_prefix="BINCOUNT_SAGEMAKER_", extra="forbid", populate_by_name=True)

    role_arn: str | None = Field(
        default=None, description="IAM role SageMaker assumes for jobs and endpoints (see docs/AWS.md)."
    )
    output_uri: str | None = Field(
        default=None,
        description="s3:// prefix for code, models and transform jobs; default: <artifact_root>/sagemaker "
        "when the artifact root is on S3.",
    )
    endpoint_url: str | None = Field(
        default=None, description="SageMaker API endpoint (a test server); unset means AWS."
    )
    runtime_endpoint_url: str | None = Field(
        default=None, description="SageMaker runtime endpoint (invocations); unset means AWS."
    )
    logs_endpoint_url: str | None = Field(
        default=None, description="CloudWatch Logs endpoint (a test server); unset means AWS."
    )
    cloudwatch_endpoint_url: str | None = Field(
        default=None, description="CloudWatch (metrics, alarms) endpoint (a test server); unset means AWS."
    )
    autoscaling_endpoint_url: str | None = Field(
        default=None, description="Application Auto Scaling endpoint (a test server); unset means AWS."
    )
    framework_version: str = Field(default="2.6.0", description="PyTorch version of the SageMaker containers.")
    py_version: str = Field(default="py312", description="Python version of the SageMaker containers.")

    train_instance_type: str = Field(default="ml.g5.xlarge", description="Instance type of training and tuning jobs.")
    train_instance_count: int = Field(default=1, ge=1, description="Instances per training job.")
    volume_size_gb: int = Field(default=30, ge=1, description="EBS volume per training instance (GB).")
    max_run_s: int = Field(default=4 * 3600, ge=60, description="Stop a training job after this long (seconds).")
    use_spot: bool = Field(default=False, description="Managed spot training, checkpointing to S3.")
    max_wait_s: int = Field(
        default=8 * 3600, ge=60, description="Spot only: give up on a job (waiting + running) after this long."
    )

    tune_max_jobs: int = Field(default=20, ge=1, description="Training jobs a tuning job runs in all.")
    tune_max_parallel_jobs: int = Field(default=2, ge=1, description="Training jobs a tuning job runs at once.")
    tune_early_stopping: Literal["Auto", "Off"] = Field(
        default="Auto", description="SageMaker's early stopping of trials."
    )

    debugger_save_interval: int = Field(default=100, ge=1, description="Save weights and gradients every N steps.")
    sagemaker_debugger: bool = Field(
        default=False,
        validation_alias="BINCOUNT_SAGEMAKER_DEBUGGER",  # not ..._SAGEMAKER_SAGEMAKER_DEBUGGER
        description="Use SageMaker's Debugger service (hook config, built-in rules in their own processing jobs, "
        "system monitoring), for accounts that still have it (closed to new customers on 2026-07-30). Off: train.py's "
        "smdebug hook and torch.profiler write into the job's output.tar.gz and the project's own rules check it.",
    )
    system_monitor_interval_ms: Literal[100, 200, 500, 1000, 5000, 60000] = Field(
        default=500, description="Debugger service only: the profiler's system monitoring interval (ms)."
    )

    deploy_instance_type: str = Field(default="ml.m5.large", description="Endpoint instance type.")
    deploy_instance_count: int = Field(default=1, ge=1, description="Endpoint instances.")
    serverless_memory_mb: Literal[1024, 2048, 3072, 4096, 5120, 6144] | None = Field(
        default=None,
        description="Serverless endpoints with this much memory (MB) instead of instances: SageMaker starts capacity "
        "per request and stops it when idle (cold starts; CPU only; no data capture, shadow or guarded rollouts). "
        "Unset: instances (docs/AWS.md: Serverless endpoints).",
    )
    serverless_max_concurrency: int = Field(
        default=5, ge=1, le=200, description="Serverless only: requests one endpoint serves at once (1-200)."
    )
    rollout_max_instances: int = Field(
        default=10,
        ge=2,
        description="Most instances a canary or linear update may run: SageMaker moves traffic by whole instances, "
        "so a 10% canary needs 10 (1 takes the canary's share); the endpoint goes back to its count afterwards.",
    )
    transform_instance_type: str = Field(default="ml.m5.xlarge", description="Batch transform instance type.")
    transform_instance_count: int = Field(default=1, ge=1, description="Batch transform instances.")
    max_payload_mb: int = Field(default=6, ge=1, le=100, description="Largest request a transform sends (MB).")
    max_concurrent_transforms: int = Field(default=4, ge=1, description="Requests in flight per transform instance.")
    transform_strategy: Literal["SingleRecord", "MultiRecord"] = Field(
        default="SingleRecord", description="One image per request (SingleRecord) or as many as fit the payload."
    )
    assemble_with: Literal["None", "Line"] = Field(
        default="None", description="How a transform joins the answers of one input object."
    )

    poll_initial_s: float = Field(default=5.0, gt=0, description="First wait between status polls.")
    poll_max_s: float = Field(default=60.0, gt=0, description="Longest wait between status polls.")
    job_timeout_s: float = Field(
        default=24 * 3600, gt=0, description="Stop waiting for (and stop) a job after this long."
    )
    endpoint_timeout_s: float = Field(
        default=3600, gt=0, description="Give up waiting for an endpoint after this long."
    )
    rules_timeout_s: float = Field(default=1800, gt=0, description="Wait this long for debugger rules after training.")

    aws_access_key_id: str | None = Field(default=None, description="Unset: the default AWS credential chain.")
    aws_secret_access_key: SecretStr | None = Field(default=None, description="With aws_access_key_id.")
    aws_session_token: SecretStr | None = Field(default=None, description="Temporary credentials only.")
    profile_name: str | None = Field(default=None, description="A named AWS profile instead of keys.")
    telemetry_opt_out: bool = Field(default=True, description="Keep the SageMaker SDK from sending telemetry.")

    @classmethod
    def load(cls, **overrides: Any) -> SageMakerOptions:
        """Options from ``BINCOUNT_SAGEMAKER_*`` variables with the non-None ``overrides`` on top.

        Raises:
            SettingsError: naming each bad option and what it expects.
        """
        try:
            return cls(**{key: value for key, value in overrides.items() if value is not None})
        except ValidationError as error:
            problems = "; ".join(
                (f"{'.'.join(map(str, p['loc']))}: " if p["loc"] else "") + p["msg"].removeprefix("Value error, ")
                for p in error.errors()
            )
            raise SettingsError(
                f"invalid SageMaker options ({problems}): fix the BINCOUNT_SAGEMAKER_* variable"
            ) from None

    @model_validator(mode="after")
    def _serverless_on_cpu(self) -> SageMakerOptions:
        if self.serverless_memory_mb is not None and is_accelerated(self.deploy_instance_type):
            raise ValueError(
                f"serverless_memory_mb is set, but deploy_instance_type {self.deploy_instance_type} has an "
                "accelerator: SageMaker serverless runs on CPU only, and the instance type picks the model's "
                "container image. Set BINCOUNT_SAGEMAKER_DEPLOY_INSTANCE_TYPE to a CPU type (ml.m5.large), or unset "
                "BINCOUNT_SAGEMAKER_SERVERLESS_MEMORY_MB to serve on GPU instances"
            )
        return self

    def serverless(self) -> dict[str, int] | None:
        """The endpoints' ``ServerlessConfig``; None when they run on instances."""
        if self.serverless_memory_mb is None:
            return None
        return serverless_config(self.serverless_memory_mb, self.serverless_max_concurrency)

    def require_role(self) -> str:
        if not self.role_arn:
            raise SettingsError(
                "SageMaker needs an execution role: set BINCOUNT_SAGEMAKER_ROLE_ARN=arn:aws:iam::<account>:role/<name> "
                "(docs/AWS.md says which permissions it needs)"
            )
        return self.role_arn

    def base_uri(self, settings: Settings) -> str:
        """The s3:// prefix for code, repacked models and transform jobs."""
        uri = self.output_uri or (
            settings.artifact_uri("sagemaker") if settings.artifact_root.startswith("s3://") else None
        )
        if not uri or not uri.startswith("s3://"):
            raise SettingsError(
                "SageMaker reads and writes S3 only: set BINCOUNT_ARTIFACT_ROOT=s3://<bucket>/bincount "
                "or BINCOUNT_SAGEMAKER_OUTPUT_URI=s3://<bucket>/<prefix>"
            )
        return uri.rstrip("/")


class EndpointSession(boto3.session.Session):
    """A boto3 session whose clients default to per-service endpoint URLs.

    The SageMaker SDK builds some S3 clients itself from its ``boto_session`` (uploads, model
    repacking), so an S3-compatible endpoint has to live in the session, not in one client.
    """

    def __init__(self, endpoint_urls: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.endpoint_urls = endpoint_urls

    def client(self, service_name: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if kwargs.get("endpoint_url") is None and service_name in self.endpoint_urls:
            kwargs["endpoint_url"] = self.endpoint_urls[service_name]
        return super().client(service_name, *args, **kwargs)


def boto_session(settings: Settings, options: SageMakerOptions) -> boto3.session.Session:
    """The boto3 session every SageMaker and S3 call of this backend goes through."""
    endpoints: dict[str, str] = {}
    if settings.s3_endpoint_url:
        endpoints["s3"] = settings.s3_endpoint_url
    if options.endpoint_url:
        endpoints["sagemaker"] = options.endpoint_url
    if options.logs_endpoint_url:
        endpoints["logs"] = options.logs_endpoint_url
    if options.cloudwatch_endpoint_url:
        endpoints["cloudwatch"] = options.cloudwatch_endpoint_url
    if options.autoscaling_endpoint_url:
        endpoints["application-autoscaling"] = options.autoscaling_endpoint_url
    if options.runtime_endpoint_url:
        endpoints["sagemaker-runtime"] = endpoints["runtime.sagemaker"] = options.runtime_endpoint_url
    session = EndpointSession(
        endpoints,
        aws_access_key_id=options.aws_access_key_id,
        aws_secret_access_key=options.aws_secret_access_key.get_secret_value()
        if options.aws_secret_access_key
        else None,
        aws_session_token=options.aws_session_token.get_secret_value() if options.aws_session_token else None,
        profile_name=options.profile_name,
        region_name=settings.aws_region,
    )
    if session.region_name is None:
        raise SettingsError("no AWS region: set BINCOUNT_AWS_REGION (or AWS_DEFAULT_REGION, or a profile's region)")
    return session


def sagemaker_session(settings: Settings, options: SageMakerOptions) -> Any:
    """A ``sagemaker.Session`` on :func:`boto_session`, with standard retries and telemetry as the options say."""
    import sagemaker
    from sagemaker.config import load_sagemaker_config

    boto = boto_session(settings, options)
    config = load_sagemaker_config()
    if options.telemetry_opt_out:
        config.setdefault("SchemaVersion", "1.0")
        config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})["TelemetryOptOut"] = (
            True
        )
    bucket = options.base_uri(settings)[len("s3://") :].split("/", 1)[0]
    return sagemaker.Session(
        boto_session=boto,
        sagemaker_client=boto.client("sagemaker", config=RETRIES),
        sagemaker_runtime_client=boto.client("sagemaker-runtime", config=RETRIES),
        default_bucket=bucket,
        sagemaker_config=config,
    )


class SageMakerBackendBase:
    """What every SageMaker backend holds: settings, options, and the ``sagemaker.Session``,
    built on first use (importing the SDK takes seconds) unless one is given."""

    def __init__(self, settings: Settings, options: SageMakerOptions | None = None, session: Any = None) -> None:
        self.settings = settings
        self.options = options or SageMakerOptions.load()
        self._session = session

    @cached_property
    def session(self) -> Any:
        return self._session or sagemaker_session(self.settings, self.options)

    @cached_property
    def logs_client(self) -> Any:
        """CloudWatch Logs on the session's boto3 session (where the jobs' containers log)."""
        return self.session.boto_session.client("logs", config=RETRIES)

    def backoff(self) -> Backoff:
        """Status polling: ``poll_initial_s``, growing to ``poll_max_s``."""
        return Backoff(self.options.poll_initial_s, self.options.poll_max_s)
