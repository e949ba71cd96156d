"""Tasks: deploy a model to a named endpoint and check it; never cached.

Call :func:`deploy_model` from a flow: it runs deploy-endpoint then check-endpoint inside one
Prefect ``transaction()``. The backend's own blue/green deploy already keeps the old model serving
when the new one fails to start; the transaction covers what comes after the switch: if the check
(or anything else in the transaction) fails, deploy-endpoint's rollback hook puts the previous
model back on the endpoint, or deletes an endpoint that did not exist before.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction, transaction

from bincount.config import Settings
from bincount.contracts.registry import ModelVersion
from bincount.contracts.serving import CaptureConfig, EndpointNotFoundError, EndpointRecord, check_answer
from bincount.endpoints import now_iso, smoke_image
from bincount.factory import get_serving_backend
from bincount.storage import storage_for


def endpoint_artifact_key(endpoint_name: str) -> str:
    """Stable per endpoint, so the UI keeps its history."""
    return f"endpoint-{endpoint_name.lower()}"


def publish_endpoint(
    record: EndpointRecord, note: str = "", status: str = "serving", monitor: str = "not monitored since this deploy"
) -> None:
    """The endpoint's artifact (stable key per endpoint): what it serves, where, whether it still does, its data
    capture, and ``monitor``: the last monitor verdict (the monitor flow republishes it)."""
    capture = record.details.get("capture")
    capturing = (
        f"{capture['sampling_percentage']}% of requests to `{record.details.get('capture_uri')}`" if capture else "off"
    )
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
            f"| data capture | {capturing} |\n"
            f"| last monitor verdict | {monitor} |\n\n"
            f"Invoke: `boto3.client('sagemaker-runtime', endpoint_url='{record.url}')"
            f".invoke_endpoint(EndpointName='{record.name}', Body=jpeg, ContentType='image/jpeg')`\n\n{note}"
        ),
        description=f"Endpoint {record.name}: {status}, model {record.model_ref or record.version}",
    )


@task(name="deploy-endpoint", cache_policy=NO_CACHE)
def deploy_endpoint_task(
    settings: Settings, endpoint_name: str, model_uri: str, model_ref: str | None, capture_percentage: int | None = None
) -> EndpointRecord:
    """Start ``endpoint_name`` on ``model_uri`` (registered as ``model_ref``), or move it there blue/green.

    ``capture_percentage``: requests captured (0 off); None keeps the endpoint's setting.
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
    logger.info(
        "Deploying %s (%s) to endpoint %r (%s)",
        model_ref,
        model_uri,
        endpoint_name,
        f"replacing {previous.model_ref or previous.version}" if previous else "new endpoint",
    )
    capture = None if capture_percentage is None else CaptureConfig(sampling_percentage=capture_percentage)
    record = backend.deploy(endpoint_name, model_uri, model_ref, capture)
    logger.info("Endpoint %r serves version %s at %s", record.name, record.version, record.url)
    publish_endpoint(record)
    return record


@deploy_endpoint_task.on_rollback
def restore_previous_endpoint(txn: Transaction) -> None:
    """Undo a deploy: the previous model back on the endpoint, or no endpoint if there was none."""
    settings = Settings.load(**txn.get("settings"))
    name: str = txn.get("endpoint_name")
    previous = txn.get("previous")
    backend = get_serving_backend(settings)
    if previous is None:
        backend.delete(name)
        return
    record = backend.deploy(name, previous["model_uri"], previous.get("model_ref"))
    replaced = previous.get("model_ref") or previous["version"]
    publish_endpoint(record, note=f"Rolled back: the deploy that replaced version {replaced} failed its checks.")


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
) -> EndpointRecord:
    """Deploy a registered version and check it in one transaction (call from a flow): a failed check rolls
    the deploy back."""
    with transaction():
        record = deploy_endpoint_task(settings, endpoint_name, version.model_uri, str(version.ref), capture_percentage)
        check_endpoint_task(settings, endpoint_name, sample_image_uri)
    return record
