"""Tasks: deploy a model to a named endpoint and check it; never cached.

Call :func:`deploy_model` from a flow: it runs deploy-endpoint then check-endpoint inside one
Prefect ``transaction()``. The backend's own deploy already keeps the old model serving when the
new one fails to start, and a canary that does worse than the current model is rolled back by the
backend itself (deploy-endpoint then fails, saying why); the transaction covers what comes after the
switch: if the check (or anything else in the transaction) fails, deploy-endpoint's rollback hook
puts the previous model back on the endpoint, or deletes an endpoint that did not exist before.

Every rollout step and verdict is a Prefect event about the endpoint (``bincount.endpoint.rollout.step``,
``.completed``, ``.rolled-back``, ``.shadowing``, ``.shadow-report``, ``.promoted``, ``.stopped``) and shows on
the endpoint's artifact with its variants, traffic weights and replicas.
"""

from __future__ import annotations

import re

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.transactions import Transaction, get_transaction, transaction

from bincount.config import Settings
from bincount.contracts.registry import ModelVersion
from bincount.contracts.serving import (
    CaptureConfig,
    DeployError,
    EndpointNotFoundError,
    EndpointRecord,
    Rollout,
    RolloutStep,
    RolloutStrategy,
    ScalingConfig,
    check_answer,
)
from bincount.endpoints import recorded_capture, recorded_scaling, smoke_image
from bincount.factory import get_serving_backend
from bincount.registry import now_iso
from bincount.storage import storage_for


def endpoint_artifact_key(endpoint_name: str) -> str:
    """Stable per endpoint, so the UI keeps its history."""
    return f"endpoint-{endpoint_name.lower()}"


def publish_endpoint(
    record: EndpointRecord, note: str = "", status: str = "serving", monitor: str = "not monitored since this deploy"
) -> None:
    """The endpoint's artifact (stable key per endpoint): what it serves, where, whether it still does, its data
    capture, variants, traffic weights and replicas, the last rollout's verdict and steps, and ``monitor``: the last
    monitor verdict (the monitor flow republishes it)."""
    capture, scaling = record.capture, record.scaling
    capturing = f"{capture.sampling_percentage}% of requests to `{record.capture_uri}`" if capture else "off"
    replicas = "-" if record.replicas is None else str(record.replicas)
    if scaling and scaling.autoscaling:
        replicas += (
            f" (autoscaling {scaling.min_replicas}-{scaling.max_replicas} at "
            f"{scaling.target_in_flight} in flight per replica)"
        )
    serving = f"`{record.serving.path}`: {record.serving.reason}" if record.serving else "-"
    create_markdown_artifact(
        key=endpoint_artifact_key(record.name),
        markdown=(
            f"### Endpoint `{record.name}`: {status}\n\n"
            "| | |\n|---|---|\n"
            f"| URL | `{record.url}` |\n"
            f"| model version | `{record.model_ref or '-'}` ({record.arch}, weights `{record.version}`) |\n"
            f"| model URI | `{record.model_uri}` |\n"
            f"| previous version | `{record.previous_model_ref or record.previous_version or '-'}` |\n"
            f"| backend | {record.backend} |\n"
            f"| deployed at | {record.deployed_at} |\n"
            f"| replicas | {replicas} |\n"
            f"| serving | {serving} |\n"
            f"| data capture | {capturing} |\n"
            f"| last monitor verdict | {monitor} |\n\n"
            f"{variants_markdown(record)}{rollout_markdown(record.rollout)}"
            f"Invoke it with a photo at `photo.jpg` (this runs as shown):\n\n```python\n{invoke_snippet(record)}\n```"
            f"\n\n{note}"
        ),
        description=f"Endpoint {record.name}: {status}, model {record.model_ref or record.version}",
    )


def invoke_snippet(record: EndpointRecord, photo: str = "photo.jpg") -> str:
    """Python that asks the endpoint for a count as a client would (boto3 ``sagemaker-runtime``), complete: it runs
    as shown, with the JPEG at ``photo``. On AWS it names the endpoint's region and uses your credentials; a local
    endpoint (or SageMaker on loopback) gets its URL, a region and dummy credentials, which any value satisfies."""
    aws = re.match(r"https://runtime\.sagemaker\.([a-z0-9-]+)\.amazonaws\.com", record.url)
    if aws:
        client = f'runtime = boto3.client("sagemaker-runtime", region_name="{aws.group(1)}")  # your AWS credentials'
    else:
        client = (
            f'runtime = boto3.client("sagemaker-runtime", endpoint_url="{record.url.split("/endpoints/")[0]}",\n'
            '                       region_name="us-east-1", aws_access_key_id="local", aws_secret_access_key="local")'
            "  # any credentials do locally"
        )
    return (
        f"import boto3\n\n{client}\n"
        f'with open("{photo}", "rb") as jpeg:\n'
        f'    answer = runtime.invoke_endpoint(EndpointName="{record.name}", Body=jpeg.read(), '
        'ContentType="image/jpeg")\n'
        'print(answer["Body"].read().decode())'
    )


def variants_markdown(record: EndpointRecord) -> str:
    """The variants the endpoint runs, their share of requests and replicas (empty when not recorded)."""
    if not record.variants:
        return ""
    rows = ""
    for variant in record.variants:
        traffic = f"{variant.weight}%"
        if variant.shadow_percent:
            traffic += f" (shadow: a copy of {variant.shadow_percent}%)"
        replicas = "-" if variant.replicas is None else variant.replicas
        rows += f"| `{variant.id}` | `{variant.model_ref or '-'}` | {traffic} | {replicas} |\n"
    return f"#### Variants\n\n| variant | model version | traffic | replicas |\n|---|---|---|---|\n{rows}\n"


def rollout_markdown(rollout: Rollout | None) -> str:
    """The last rollout: strategy, verdict and reason, and its steps with their metrics."""
    if rollout is None:
        return ""
    strategy = rollout.strategy
    shape = strategy.kind
    if shape != "all-at-once":
        shape += f" {strategy.traffic_percent}%, bake {strategy.bake_seconds} s"
    rows = "".join(
        f"| {step.at} | {step.action} | {step.percent}% | {step.verdict or ''} "
        f"| {step.reason or ''} | {_step_metrics(step)} |\n"
        for step in rollout.steps
    )
    return (
        f"#### Last rollout: {shape}: **{rollout.verdict}**\n\n{rollout.reason}\n\n"
        f"| at | step | new model's share | verdict | reason | metrics |\n|---|---|---|---|---|---|\n{rows}\n"
    )


def _step_metrics(step: RolloutStep) -> str:
    parts = []
    for role, traffic in (("current", step.current), ("new", step.candidate)):
        if traffic is not None:
            p99 = f"{traffic.p99_ms:.0f} ms" if traffic.p99_ms is not None else "-"
            parts.append(f"{role}: {traffic.requests} req, {traffic.errors} err, p99 {p99}")
    return "; ".join(parts)


def emit_rollout_events(record: EndpointRecord, steps_from: int = 0) -> None:
    """``bincount.endpoint.rollout.step`` for each step of the record's last rollout from ``steps_from``, then
    ``bincount.endpoint.rollout.<verdict>`` (and ``.shadow-report`` when it carries one)."""
    rollout = record.rollout
    if rollout is None:
        return
    resource = {"prefect.resource.id": f"bincount.endpoint.{record.name}", "prefect.resource.name": record.name}
    for step in rollout.steps[steps_from:]:
        emit_event(event="bincount.endpoint.rollout.step", resource=resource, payload=step.to_dict())
    if rollout.report is not None:
        emit_event(event="bincount.endpoint.rollout.shadow-report", resource=resource, payload=rollout.report.to_dict())
    payload = {"verdict": rollout.verdict, "reason": rollout.reason, "model_version": record.model_ref}
    emit_event(event=f"bincount.endpoint.rollout.{rollout.verdict}", resource=resource, payload=payload)


def already_serves(
    record: EndpointRecord,
    model_uri: str,
    model_ref: str | None,
    capture_percentage: int | None,
    scaling: ScalingConfig | None,
) -> bool:
    """Whether deploying ``model_uri`` (``model_ref``) to the endpoint ``record`` describes would change nothing: the
    same model already takes every request (no shadow or canary beside it), with the capture and scaling asked."""
    return (
        (record.model_uri, record.model_ref) == (model_uri, model_ref or record.model_ref)
        and record.shadow is None
        and len(record.variants) <= 1
        and capture_percentage in (None, recorded_capture(record).sampling_percentage)
        and scaling in (None, recorded_scaling(record))
    )


@task(name="deploy-endpoint", cache_policy=NO_CACHE)
def deploy_endpoint_task(
    settings: Settings,
    endpoint_name: str,
    model_uri: str,
    model_ref: str | None,
    capture_percentage: int | None = None,
    strategy: RolloutStrategy | None = None,
    scaling: ScalingConfig | None = None,
) -> EndpointRecord:
    """Start ``endpoint_name`` on ``model_uri`` (registered as ``model_ref``), or move it there as ``strategy`` says
    (None: all at once, blue/green). Raises :class:`DeployError` when a canary was rolled back.

    ``capture_percentage``: requests captured (0 off); None keeps the endpoint's setting. ``scaling`` None keeps
    the endpoint's replicas (one for a new endpoint).
    """
    logger = get_run_logger()
    backend = get_serving_backend(settings)
    try:
        previous: EndpointRecord | None = backend.describe(endpoint_name)
    except EndpointNotFoundError:
        previous = None
    txn = get_transaction()
    if txn is not None:  # what the rollback hook needs to undo this deploy
        txn.set("settings", settings.model_dump(mode="json"))
        txn.set("endpoint_name", endpoint_name)
        txn.set("previous", previous.to_dict() if previous else None)
    if previous is not None and already_serves(previous, model_uri, model_ref, capture_percentage, scaling):
        logger.info(
            "Endpoint %r already serves %s (%s): nothing deployed, nothing compared with itself",
            endpoint_name,
            model_ref or previous.version,
            model_uri,
        )
        return previous
    logger.info(
        "Deploying %s (%s) to endpoint %r (%s)",
        model_ref,
        model_uri,
        endpoint_name,
        f"replacing {previous.model_ref or previous.version}" if previous else "new endpoint",
    )
    capture = None if capture_percentage is None else CaptureConfig(sampling_percentage=capture_percentage)
    record = backend.deploy(endpoint_name, model_uri, model_ref, capture, strategy, scaling)
    emit_rollout_events(record)
    rollout = record.rollout
    if rollout is not None and rollout.verdict == "rolled-back":
        publish_endpoint(record, note=f"The rollout of {model_ref or model_uri} was rolled back: {rollout.reason}")
        raise DeployError(
            f"the {rollout.strategy.kind} of {model_ref or model_uri} on endpoint {endpoint_name!r} was rolled "
            f"back by itself: {rollout.reason}; {record.model_ref or record.version} still serves every request"
        )
    if record.shadow is not None:
        logger.info(
            "%s shadows %s on endpoint %r; `bincount endpoints promote-shadow %s` (or stop-shadow) ends it",
            model_ref or model_uri,
            record.model_ref or record.version,
            record.name,
            record.name,
        )
    else:
        logger.info("Endpoint %r serves version %s at %s", record.name, record.version, record.url)
    publish_endpoint(record)
    return record


@deploy_endpoint_task.on_rollback
def restore_previous_endpoint(txn: Transaction) -> None:
    """Undo a deploy: the previous model back on the endpoint, or no endpoint if there was none."""
    settings = Settings.load(**txn.get("settings"))
    name: str = txn.get("endpoint_name")
    recorded = txn.get("previous")
    backend = get_serving_backend(settings)
    if recorded is None:
        backend.delete(name)
        return
    previous = EndpointRecord.from_dict(recorded)
    if backend.describe(name).model_uri == previous.model_uri:  # a canary already rolled back: it still serves
        return
    record = backend.deploy(name, previous.model_uri, previous.model_ref)
    replaced = previous.model_ref or previous.version
    publish_endpoint(record, note=f"Rolled back: the deploy that replaced version {replaced} failed its checks.")


@task(name="describe-endpoint", cache_policy=NO_CACHE)
def describe_endpoint_task(settings: Settings, endpoint_name: str) -> EndpointRecord | None:
    """What ``endpoint_name`` serves now (its record), or None when no such endpoint is recorded."""
    try:
        return get_serving_backend(settings).describe(endpoint_name)
    except EndpointNotFoundError:
        return None


@task(name="stop-endpoint", cache_policy=NO_CACHE)
def stop_endpoint_task(settings: Settings, endpoint_name: str) -> EndpointRecord | None:
    """Stop ``endpoint_name`` and forget its record; its artifact then says "stopped". Returns the last record
    (None for an endpoint that exists but was never recorded: a SageMaker endpoint whose first deploy failed)."""
    logger = get_run_logger()
    backend = get_serving_backend(settings)
    try:
        record: EndpointRecord | None = backend.describe(endpoint_name)
    except EndpointNotFoundError:
        record = None
    served = f"serving {record.model_ref or record.version} at {record.url}" if record else "never recorded"
    logger.info("Stopping endpoint %r (%s)", endpoint_name, served)
    backend.delete(endpoint_name)  # raises EndpointNotFoundError when there is nothing to stop at all
    if record is not None:
        publish_endpoint(record, note=f"Stopped at {now_iso()}; `{record.url}` no longer answers.", status="stopped")
    return record


@task(name="check-endpoint", cache_policy=NO_CACHE)
def check_endpoint_task(settings: Settings, endpoint_name: str, sample_image_uri: str | None = None) -> int:
    """Invoke the endpoint as a client would (boto3 ``sagemaker-runtime``); return the count it answers.

    Uses ``sample_image_uri`` (a JPEG or PNG), else a synthetic bin photo at the model's size.
    """
    logger = get_run_logger()
    backend = get_serving_backend(settings)
    record = backend.describe(endpoint_name)
    body = storage_for(settings).read_bytes(sample_image_uri) if sample_image_uri else smoke_image(record.image_size)
    content_type = "image/png" if (sample_image_uri or "").lower().endswith(".png") else "image/jpeg"
    count = check_answer(backend.invoke(endpoint_name, body, content_type), record.classes)
    logger.info("Endpoint %r answered count %d for %s", endpoint_name, count, sample_image_uri or "a synthetic photo")
    return count


def deploy_model(
    settings: Settings,
    endpoint_name: str,
    version: ModelVersion,
    sample_image_uri: str | None = None,
    capture_percentage: int | None = None,
    strategy: RolloutStrategy | None = None,
    scaling: ScalingConfig | None = None,
) -> EndpointRecord:
    """Deploy a registered version and check it in one transaction (call from a flow): a failed check rolls
    the deploy back."""
    with transaction():
        record = deploy_endpoint_task(
            settings,
            endpoint_name,
            version.model_uri,
            str(version.ref),
            capture_percentage=capture_percentage,
            strategy=strategy,
            scaling=scaling,
        )
        check_endpoint_task(settings, endpoint_name, sample_image_uri)
    return record


@task(name="end-shadow", cache_policy=NO_CACHE)
def end_shadow_task(settings: Settings, endpoint_name: str, promote: bool) -> EndpointRecord:
    """Promote the shadow of ``endpoint_name`` (it answers from now on) or stop it; its report goes on the artifact
    and in the events."""
    logger = get_run_logger()
    backend = get_serving_backend(settings)
    before = backend.describe(endpoint_name).rollout
    record = backend.promote_shadow(endpoint_name) if promote else backend.stop_shadow(endpoint_name)
    emit_rollout_events(record, len(before.steps) if before else 0)
    report = record.rollout.report if record.rollout else None
    logger.info(
        "Shadow on %r %s (agreement %s, its report advised %s)",
        endpoint_name,
        "promoted" if promote else "stopped",
        report.agreement if report else None,
        "promoting" if report and report.promote else "not promoting",
    )
    publish_endpoint(record)
    return record
