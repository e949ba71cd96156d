"""Data capture on SageMaker: the endpoint config's DataCaptureConfig, validated by botocore against the real
service model (moto's SageMaker API, as in test_sagemaker_backend.py); the setting is kept across redeploys.
SageMaker's capture records carry no status: the monitor's error rate comes from CloudWatch's AWS/SageMaker
metrics (moto's CloudWatch on loopback keeps and sums them; requests validated against the service model)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid

import pytest
from sagemaker_moto import BUCKET, Captured, MotoSageMaker, prediction, queue_answers

from bincount.capture import capture_prefix
from bincount.config import Location, Settings
from bincount.contracts.serving import CaptureConfig, DeployError, EndpointRecord
from bincount.endpoints import EndpointRecords
from bincount.factory import get_invocation_metrics, get_serving_backend
from bincount.loopback_s3 import LoopbackS3
from bincount.registry import now_iso
from bincount.sagemaker.metrics import SageMakerInvocationMetrics
from bincount.sagemaker.serving import SageMakerServingBackend
from bincount.storage import storage_for
from flows.monitor import monitor_endpoint


def test_capture_goes_into_the_endpoint_config_and_stays_across_redeploys(
    sagemaker_env: Settings,
    models: dict[int, str],
    moto_sagemaker: MotoSageMaker,
) -> None:
    backend = get_serving_backend(sagemaker_env)
    assert isinstance(backend, SageMakerServingBackend)
    captured = Captured(backend.client)
    name = f"bincount-cap-{uuid.uuid4().hex[:8]}"

    queue_answers(prediction(2))
    first = backend.deploy(name, models[1], "g:1", capture=CaptureConfig(sampling_percentage=25))
    (config,) = captured("CreateEndpointConfig")  # validated against SageMaker's service model
    assert config["DataCaptureConfig"] == {
        "EnableCapture": True,
        "InitialSamplingPercentage": 25,
        "DestinationS3Uri": f"s3://{BUCKET}/bincount/data-capture",
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"], "CsvContentTypes": ["text/csv"]},
    }
    assert first.capture_uri == f"s3://{BUCKET}/bincount/data-capture/{name}/AllTraffic"

    queue_answers(prediction(3))
    second = backend.deploy(name, models[2], "g:2")  # no capture given: the endpoint keeps its setting
    assert captured("CreateEndpointConfig")[1]["DataCaptureConfig"]["InitialSamplingPercentage"] == 25
    assert second.capture and second.capture.sampling_percentage == 25

    queue_answers(prediction(3))
    third = backend.deploy(
        name, models[2], "g:2", capture=CaptureConfig(sampling_percentage=0)
    )  # turned off: a new config
    off = captured("CreateEndpointConfig")[2]
    assert "DataCaptureConfig" not in off and third.details["endpoint_config"] != second.details["endpoint_config"]
    assert third.capture is None
    backend.delete(name)


def test_capture_needs_an_s3_artifact_root(
    sagemaker_env: Settings, models: dict[int, str], moto_sagemaker: MotoSageMaker, tmp_path
) -> None:
    backend = SageMakerServingBackend(Settings.load(**{**sagemaker_env.model_dump(), "artifact_root": str(tmp_path)}))
    with pytest.raises(DeployError, match=r"data capture on SageMaker writes to S3.*BINCOUNT_ARTIFACT_ROOT=s3://"):
        backend.data_capture_config(CaptureConfig(sampling_percentage=10))


@pytest.fixture
def metrics(
    sagemaker_env: Settings, s3_server: LoopbackS3, monkeypatch: pytest.MonkeyPatch
) -> SageMakerInvocationMetrics:
    monkeypatch.setenv("BINCOUNT_SAGEMAKER_CLOUDWATCH_ENDPOINT_URL", s3_server.endpoint_url)
    found = get_invocation_metrics(sagemaker_env)
    assert isinstance(found, SageMakerInvocationMetrics)
    return found


def invocations(
    metrics: SageMakerInvocationMetrics, endpoint: str, at: dt.datetime, total: int, model: int, client: int
) -> None:
    """What SageMaker publishes for the production variant's answers in one minute."""
    dimensions = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": "AllTraffic"}]
    metrics.client.put_metric_data(
        Namespace="AWS/SageMaker",
        MetricData=[
            {"MetricName": name, "Dimensions": dimensions, "Value": value, "Timestamp": at}
            for name, value in (("Invocations", total), ("Invocation5XXErrors", model), ("Invocation4XXErrors", client))
        ],
    )


def test_invocation_counts_are_the_endpoints_own_in_the_window(metrics: SageMakerInvocationMetrics) -> None:
    sent = Captured(metrics.client)
    name, other = f"cw-{uuid.uuid4().hex[:8]}", f"cw-{uuid.uuid4().hex[:8]}"
    now = dt.datetime.now(dt.UTC)
    invocations(metrics, name, now - dt.timedelta(minutes=20), 40, 6, 9)
    invocations(metrics, name, now - dt.timedelta(minutes=10), 10, 0, 1)
    invocations(metrics, name, now - dt.timedelta(hours=3), 50, 50, 0)  # before the window
    invocations(metrics, other, now - dt.timedelta(minutes=10), 10, 10, 0)  # another endpoint
    counts = metrics.invocation_counts(name, now - dt.timedelta(hours=1), now)
    assert (counts.invocations, counts.model_errors, counts.client_errors) == (50, 6, 10)
    assert counts.start <= now - dt.timedelta(hours=1) and counts.end >= now and "AWS/SageMaker" in counts.source
    (request,) = sent("GetMetricData")  # validated against CloudWatch's service model
    queried = {q["MetricStat"]["Metric"]["MetricName"]: q["MetricStat"] for q in request["MetricDataQueries"]}
    assert set(queried) == {"Invocations", "Invocation5XXErrors", "Invocation4XXErrors"}
    assert all(stat["Stat"] == "Sum" and stat["Metric"]["Namespace"] == "AWS/SageMaker" for stat in queried.values())
    assert all(stat["Period"] % 60 == 0 for stat in queried.values())


def sagemaker_line(at: dt.datetime, count: int) -> str:
    """A capture line as SageMaker writes it: no status, no latency."""
    return json.dumps(
        {
            "captureData": {
                "endpointInput": {
                    "observedContentType": "image/jpeg",
                    "mode": "INPUT",
                    "data": base64.b64encode(b"not decoded here").decode(),
                    "encoding": "BASE64",
                },
                "endpointOutput": {
                    "observedContentType": "application/json",
                    "mode": "OUTPUT",
                    "data": prediction(count),
                    "encoding": "JSON",
                },
            },
            "eventMetadata": {"eventId": str(uuid.uuid4()), "inferenceTime": at.strftime("%Y-%m-%dT%H:%M:%SZ")},
            "eventVersion": "0",
        }
    )


def test_on_aws_the_monitor_reads_the_error_rate_from_cloudwatch(
    prefect_server: None, sagemaker_env: Settings, metrics: SageMakerInvocationMetrics
) -> None:
    name = f"cw-{uuid.uuid4().hex[:8]}"
    storage = storage_for(sagemaker_env)
    record = EndpointRecord(
        name, "", "s3://m/model.tar.gz", "0" * 12, "resnet18", 64, [1, 2, 3, 4, 5], "sagemaker", now_iso()
    )
    EndpointRecords(sagemaker_env, storage).write(record)
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=30)
    lines = [sagemaker_line(start + dt.timedelta(seconds=s), 1 + s % 5) for s in range(20)]
    key = f"{start:%Y/%m/%d/%H}/{start:%M-%S}-000-abc.jsonl"
    storage.write_bytes(f"{capture_prefix(sagemaker_env.artifact_root, name)}/{key}", "\n".join(lines).encode() + b"\n")
    invocations(metrics, name, start - dt.timedelta(minutes=1), 200, 20, 30)

    (report,) = monitor_endpoint([name], location=Location.of(sagemaker_env))
    assert report.requests == 20 and report.invocations == 200, report
    assert (report.errors, report.client_errors) == (20, 30) and report.error_rate == pytest.approx(0.1)
    assert report.error_rate_high and "CloudWatch" in report.error_source
