"""Data capture on SageMaker: the endpoint config's DataCaptureConfig, validated by botocore against the real
service model (moto's SageMaker API, as in test_sagemaker_backend.py); the setting is kept across redeploys."""

from __future__ import annotations

import uuid

import pytest
from sagemaker_moto import BUCKET, Captured, MotoSageMaker, prediction, queue_answers

from bincount.config import Settings
from bincount.contracts.serving import CaptureConfig, DeployError
from bincount.factory import get_serving_backend
from bincount.sagemaker.serving import SageMakerServingBackend


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
    assert first.details["capture_uri"] == f"s3://{BUCKET}/bincount/data-capture/{name}/AllTraffic"

    queue_answers(prediction(3))
    second = backend.deploy(name, models[2], "g:2")  # no capture given: the endpoint keeps its setting
    assert captured("CreateEndpointConfig")[1]["DataCaptureConfig"]["InitialSamplingPercentage"] == 25
    assert second.details["capture"]["sampling_percentage"] == 25

    queue_answers(prediction(3))
    third = backend.deploy(
        name, models[2], "g:2", capture=CaptureConfig(sampling_percentage=0)
    )  # turned off: a new config
    off = captured("CreateEndpointConfig")[2]
    assert "DataCaptureConfig" not in off and third.details["endpoint_config"] != second.details["endpoint_config"]
    assert third.details["capture"] is None
    backend.delete(name)


def test_capture_needs_an_s3_artifact_root(
    sagemaker_env: Settings, models: dict[int, str], moto_sagemaker: MotoSageMaker, tmp_path
) -> None:
    backend = SageMakerServingBackend(Settings.load(**{**sagemaker_env.model_dump(), "artifact_root": str(tmp_path)}))
    with pytest.raises(DeployError, match=r"data capture on SageMaker writes to S3.*BINCOUNT_ARTIFACT_ROOT=s3://"):
        backend.data_capture_config(CaptureConfig(sampling_percentage=10))
