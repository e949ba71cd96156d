"""The registry's SageMaker Model Registry mirror through the real SageMaker SDK and boto3, against moto on loopback.

moto answers CreateModelPackageGroup, CreateModelPackage, UpdateModelPackage and their describes;
every request is also validated by botocore against the real service model. moto stores the
ClientToken but does not act on it (a real account returns the first package for a repeated token),
so the idempotence tested here is the registry's own: a retried registration publishes only when
the first did not finish.
"""

from __future__ import annotations

import io
import tarfile
import uuid
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from sagemaker_moto import REGION, ROLE, Captured, model_archive

from bincount.config import Settings
from bincount.contracts.registry import (
    DatasetRef,
    InvalidTransitionError,
    ModelMetrics,
    ModelVersionSpec,
)
from bincount.loopback_s3 import LoopbackS3
from bincount.registry import StorageModelRegistry, object_sha256
from bincount.sagemaker.model_registry import SageMakerModelRegistry, metadata_value
from bincount.sagemaker.session import SageMakerOptions
from bincount.storage import Storage


@pytest.fixture
def world(s3_server: LoopbackS3) -> tuple[Settings, SageMakerOptions, str]:
    bucket = f"model-registry-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=REGION).create_bucket(Bucket=bucket)
    settings = Settings.load(
        profile="aws",
        artifact_root=f"s3://{bucket}/bincount",
        s3_endpoint_url=s3_server.endpoint_url,
        aws_region=REGION,
    )
    options = SageMakerOptions.load(
        role_arn=ROLE, endpoint_url=s3_server.endpoint_url, runtime_endpoint_url=s3_server.endpoint_url
    )
    return settings, options, bucket


def register_spec(storage: Storage, settings: Settings, seed: int) -> ModelVersionSpec:
    uri = settings.artifact_uri("training-jobs", f"bincount-final-{seed}", "output", "model.tar.gz")
    storage.write_bytes(uri, model_archive(seed))
    return ModelVersionSpec(
        model_uri=uri,
        model_sha256=object_sha256(storage, uri),
        metrics=ModelMetrics(0.61, 0.9, 0.95, {"1": 0.7, "2": 0.5}, 120),
        dataset=DatasetRef(
            settings.artifact_uri("datasets", "abid", "split.csv"), "ab" * 32, {"train": 960, "valid": 120, "test": 120}
        ),
        code_hash="cd" * 32,
        hyperparameters={
            "lr": 0.02,
            "batch-size": 64,
            "epochs": 4,
            "train-channels": "train,valid",
            "optimizer": "adamw",
        },
        training_job=f"bincount-final-{seed}",
        flow_run_id=str(uuid.UUID(int=seed)),
        flow_run_url=f"http://127.0.0.1:4200/runs/flow-run/{uuid.UUID(int=seed)}",
    )


def test_versions_and_approvals_reach_sagemaker_model_registry(world: tuple[Settings, SageMakerOptions, str]) -> None:
    settings, options, bucket = world
    storage = Storage(s3_endpoint_url=settings.s3_endpoint_url, region=REGION)
    mirror = SageMakerModelRegistry(settings, options)
    captured = Captured(mirror.client)
    registry = StorageModelRegistry(storage, settings.artifact_root, mirror=mirror)
    group = f"bincount-{uuid.uuid4().hex[:8]}"

    first = registry.register(group, register_spec(storage, settings, 1))
    second = registry.register(group, register_spec(storage, settings, 2))
    assert registry.register(group, second.spec).mirror == second.mirror, "a retry publishes nothing new"

    (group_request,) = captured("CreateModelPackageGroup")  # the second registration found the group
    assert group_request["ModelPackageGroupName"] == group
    first_request, second_request = captured("CreateModelPackage")
    assert first_request["ModelApprovalStatus"] == "PendingManualApproval"
    (container,) = first_request["InferenceSpecification"]["Containers"]
    assert container["Image"] == f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-inference:2.6.0-cpu-py312"
    assert container["ModelDataUrl"].startswith(f"s3://{bucket}/bincount/sagemaker/models/")  # repacked with sm_scripts
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(container["ModelDataUrl"])), mode="r:gz") as repacked:
        assert {"model.pt", "model_info.json", "code/inference.py", "code/train.py"} <= set(repacked.getnames())
    assert first_request["InferenceSpecification"]["SupportedRealtimeInferenceInstanceTypes"] == ["ml.m5.large"]
    metadata = first_request["CustomerMetadataProperties"]
    assert metadata["bincount-version"] == f"{group}:1" and metadata["model-sha256"] == first.spec.model_sha256
    assert metadata["hp-train-channels"] == "train_valid" and metadata["flow-run-url"] == first.spec.flow_run_url
    assert first_request["MetadataProperties"] == {
        "GeneratedBy": "bincount-final-1",
        "CommitId": "cd" * 32,
        "ProjectId": "bincount",
    }
    assert first_request["ClientToken"] != second_request["ClientToken"]

    arn = first.mirror["model_package_arn"]
    assert mirror.client.describe_model_package(ModelPackageName=arn)["ModelPackageGroupName"] == group
    registry.approve(group, 1, "alice", "confusion matrix looks right")
    registry.reject(group, 2, "bob", "miscounts 5s")
    updates = captured("UpdateModelPackage")
    assert [(u["ModelApprovalStatus"], u["ApprovalDescription"]) for u in updates] == [
        ("Approved", "confusion matrix looks right"),
        ("Rejected", "miscounts 5s"),
    ]
    statuses = {
        p["ModelPackageArn"]: p["ModelApprovalStatus"]
        for p in mirror.client.list_model_packages(ModelPackageGroupName=group)["ModelPackageSummaryList"]
    }
    assert statuses == {arn: "Approved", second.mirror["model_package_arn"]: "Rejected"}
    with pytest.raises(InvalidTransitionError):
        registry.approve(group, 2, "carol", "try again")
    assert len(captured("UpdateModelPackage")) == 2, "a refused approval sends nothing"


def test_a_failed_publish_is_finished_by_the_retry(world: tuple[Settings, SageMakerOptions, str]) -> None:
    settings, options, _ = world
    storage = Storage(s3_endpoint_url=settings.s3_endpoint_url, region=REGION)
    mirror = SageMakerModelRegistry(settings, options)
    registry = StorageModelRegistry(storage, settings.artifact_root, mirror=mirror)
    group = f"bincount-{uuid.uuid4().hex[:8]}"

    def throttle(**_: Any) -> None:  # what SageMaker answers when the account's request rate is exceeded
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "CreateModelPackage")

    mirror.client.meta.events.register_first("before-call.sagemaker.CreateModelPackage", throttle)
    spec = register_spec(storage, settings, 7)
    try:
        with pytest.raises(ClientError, match="Rate exceeded"):
            registry.register(group, spec)
    finally:
        mirror.client.meta.events.unregister("before-call.sagemaker.CreateModelPackage", throttle)
    (recorded,) = registry.list(group)
    assert recorded.mirror == {}, "recorded here, not yet there"
    retried = registry.register(group, spec)
    assert retried.version == 1 and retried.mirror["model_package_arn"].endswith(f"model-package/{group}/1")
    assert [v.version for v in registry.list(group)] == [1]


def test_metadata_values_keep_sagemakers_character_rule() -> None:
    assert metadata_value("s3://bucket/a b/c=d+e@f") == "s3://bucket/a b/c=d+e@f"
    assert metadata_value('{"lr": 0.1,\n"x": 2}') == "__lr_: 0.1___x_: 2_"
    assert len(metadata_value("x" * 300)) == 256 and metadata_value("") == "-"
