"""The strict request checker (tests/strict_requests.py) itself: it rejects what botocore's own validation lets
through, on a client built the way the project builds them, before anything is sent."""

from __future__ import annotations

import boto3
import pytest
from botocore.validate import validate_parameters
from sagemaker_moto import REGION
from strict_requests import StrictRequestError, problems

BAD_UPDATE = {
    "EndpointName": "bincount!" + "x" * 193,  # 202 characters, and a '!'
    "EndpointConfigName": "bincount-config",
    "DeploymentConfig": {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": "NOT_A_TYPE", "WaitIntervalInSeconds": 99999},
        },
    },
}
ROUTING = "DeploymentConfig.BlueGreenUpdatePolicy.TrafficRoutingConfiguration"


def test_botocore_alone_lets_the_bad_update_through() -> None:
    """Why the checker exists: botocore checks types, required fields and minimums only."""
    shape = boto3.client("sagemaker", region_name=REGION).meta.service_model.operation_model("UpdateEndpoint")
    validate_parameters(BAD_UPDATE, shape.input_shape)  # raises nothing


def test_the_checker_names_the_operation_each_field_and_the_rule(strict_request_check: list[str]) -> None:
    # A port nothing listens on: the request must be refused before it is sent, not by a server.
    client = boto3.client("sagemaker", region_name=REGION, endpoint_url="http://127.0.0.1:9")
    with pytest.raises(StrictRequestError) as refused:
        client.update_endpoint(**BAD_UPDATE)
    message = str(refused.value)
    assert message.startswith("SageMaker UpdateEndpoint: ")
    assert "EndpointName: 'bincount!xxx" in message and "(202 characters)" in message
    assert "EndpointName: length 202 is above 63 (max)" in message
    assert "does not match [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62} (pattern)" in message
    assert f"{ROUTING}.Type: 'NOT_A_TYPE' is not one of ALL_AT_ONCE, CANARY, LINEAR (enum)" in message
    assert f"{ROUTING}.WaitIntervalInSeconds: value 99999 is above 3600 (max)" in message
    assert strict_request_check == [message]  # the fixture would fail this test with it at the end
    strict_request_check.clear()


def test_a_good_request_passes_and_lists_maps_and_other_services_are_checked() -> None:
    sagemaker = boto3.client("sagemaker", region_name=REGION).meta.service_model
    good = {**BAD_UPDATE, "EndpointName": "bincount-a1", "DeploymentConfig": {}}
    update = sagemaker.operation_model("UpdateEndpoint").input_shape
    assert problems(update, good) == []
    assert problems(update, {**good, "EndpointName": "bincount!"}) == [  # the whole name must match
        "EndpointName: 'bincount!' does not match [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62} (pattern)"
    ]

    config = {
        "EndpointConfigName": "c",
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "m", "InstanceType": "ml.nope"}],
        "Tags": [{"Key": "project", "Value": "bin!count"}],
    }
    assert problems(sagemaker.operation_model("CreateEndpointConfig").input_shape, config) == [
        "ProductionVariants[0].InstanceType: 'ml.nope' is not one of "
        + ", ".join(sagemaker.shape_for("ProductionVariantInstanceType").enum)
        + " (enum)",
        "Tags[0].Value: 'bin!count' does not match ([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*) (pattern)",
    ]
    training = {"HyperParameters": {"k" * 257: "v"}}
    found = problems(sagemaker.operation_model("CreateTrainingJob").input_shape, training)
    assert found == [f"HyperParameters key {'k' * 257!r}: length 257 is above 256 (max)"]

    cloudwatch = boto3.client("cloudwatch", region_name=REGION).meta.service_model
    alarm = {"AlarmName": "a", "EvaluationPeriods": 0, "ComparisonOperator": "Bigger"}
    assert problems(cloudwatch.operation_model("PutMetricAlarm").input_shape, alarm) == [
        "EvaluationPeriods: value 0 is below 1 (min)",
        "ComparisonOperator: 'Bigger' is not one of "
        + ", ".join(cloudwatch.shape_for("ComparisonOperator").enum)
        + " (enum)",
    ]
