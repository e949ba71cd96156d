"""SageMaker Model Registry as a mirror of the project's registry (profile ``aws``).

    registered here ─► CreateModelPackageGroup (once per group) ─► CreateModelPackage (PendingManualApproval)
    approved/rejected here ─► UpdateModelPackage (ModelApprovalStatus, ApprovalDescription)

Each version becomes a model package of the group of the same name. Its InferenceSpecification
is the container a deploy creates (:meth:`PyTorchModel.prepare_container_def`: the PyTorch
inference image for the options' framework and instance type, the model repacked with
``sm_scripts/`` and ``inference.py`` as the entry point), so a package can be deployed from
SageMaker Studio or a CI pipeline as the project deploys it. The lineage (model sha256, code hash,
training job, dataset, flow run) goes into CustomerMetadataProperties. CreateModelPackage carries
a ClientToken derived from the version, so a retried publish returns the package the first made.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from botocore.exceptions import ClientError

from bincount.code import INFERENCE_ENTRY_POINT, SM_SCRIPTS_DIR
from bincount.contracts.naming import check_name, short_hash
from bincount.contracts.registry import ApprovalStatus, ModelVersion, RegistryError
from bincount.sagemaker.session import SageMakerBackendBase, require_s3, resource_tags
from bincount.sagemaker.waiting import is_not_found
from bincount.storage import join_uri

logger = logging.getLogger(__name__)

CONTENT_TYPES = ["application/x-image", "image/jpeg", "image/png", "application/json"]
RESPONSE_TYPES = ["application/json", "text/csv"]
ARN_KEY = "model_package_arn"
_METADATA_VALUE = re.compile(r"[^\w .:/=+\-@]")


def metadata_value(value: Any) -> str:
    """``value`` as CustomerMetadataProperties accept it: 1-256 letters, digits, spaces and ``_.:/=+-@``."""
    return _METADATA_VALUE.sub("_", str(value))[:256] or "-"


def customer_metadata(version: ModelVersion) -> dict[str, str]:
    spec = version.spec
    values: dict[str, Any] = {
        "bincount-version": f"{version.group}:{version.version}",
        "model-sha256": spec.model_sha256,
        "code-hash": spec.code_hash,
        "training-job": spec.training_job,
        "dataset-split-uri": spec.dataset.split_uri,
        "dataset-split-sha256": spec.dataset.split_sha256,
        "accuracy": round(spec.metrics.accuracy, 4),
        "rmse": round(spec.metrics.rmse, 4),
        "within-one-accuracy": round(spec.metrics.within_one_accuracy, 4),
        **({"flow-run-id": spec.flow_run_id} if spec.flow_run_id else {}),
        **({"flow-run-url": spec.flow_run_url} if spec.flow_run_url else {}),
        **{f"hp-{name}": value for name, value in sorted(spec.hyperparameters.items())},
    }
    return {key[:128]: metadata_value(value) for key, value in list(values.items())[:50]}


class SageMakerModelRegistry(SageMakerBackendBase):
    """The :class:`~bincount.contracts.registry.RegistryMirror` on SageMaker Model Registry."""

    @property
    def client(self) -> Any:
        return self.session.sagemaker_client

    def ensure_group(self, group: str) -> str:
        """The ARN of model package group ``group``, created if absent (a concurrent creation is fine)."""
        try:
            return self.client.describe_model_package_group(ModelPackageGroupName=group)["ModelPackageGroupArn"]
        except ClientError as error:
            if not is_not_found(error):
                raise
        logger.info("creating model package group %s", group)
        try:
            return self.client.create_model_package_group(
                ModelPackageGroupName=group,
                ModelPackageGroupDescription=f"bincount models of endpoint {group} (mirrored from its registry)",
                Tags=resource_tags(model_group=group),
            )["ModelPackageGroupArn"]
        except ClientError:
            # Another run created it between our describe and create; anything else fails the describe too.
            return self.client.describe_model_package_group(ModelPackageGroupName=group)["ModelPackageGroupArn"]

    def container(self, version: ModelVersion) -> dict[str, Any]:
        """The container a deploy of ``version`` runs: PyTorch inference image, repacked model, environment."""
        from sagemaker.pytorch import PyTorchModel

        options = self.options
        name = check_name(
            f"bincount-package-{version.version}-"
            + short_hash(version.group, version.spec.model_sha256, version.spec.code_hash, length=8),
            "model",
        )
        definition = PyTorchModel(
            model_data=require_s3(version.spec.model_uri, "model URI"),
            role=options.require_role(),
            entry_point=INFERENCE_ENTRY_POINT,
            source_dir=str(SM_SCRIPTS_DIR),
            framework_version=options.framework_version,
            py_version=options.py_version,
            name=name,
            code_location=join_uri(options.base_uri(self.settings), "models"),
            sagemaker_session=self.session,
        ).prepare_container_def(instance_type=options.deploy_instance_type)
        return {
            "Image": definition["Image"],
            "ModelDataUrl": definition["ModelDataUrl"],
            "Environment": definition["Environment"],
            "Framework": "PYTORCH",
            "FrameworkVersion": options.framework_version,
        }

    def publish(self, version: ModelVersion) -> dict[str, str]:
        """Register ``version`` as a model package of its group; ``{"model_package_arn": ...}``."""
        self.ensure_group(version.group)
        spec = version.spec
        token = short_hash(version.group, version.version, spec.model_uri, spec.model_sha256, length=32)
        logger.info(
            "registering %s:%s in SageMaker model package group %s", version.group, version.version, version.group
        )
        answer = self.client.create_model_package(
            ModelPackageGroupName=version.group,
            ModelPackageDescription=(
                f"{version.group}:{version.version} from training job {spec.training_job}, test accuracy "
                f"{spec.metrics.accuracy:.4f} on {spec.dataset.split_uri}"
            )[:1024],
            InferenceSpecification={
                "Containers": [self.container(version)],
                "SupportedContentTypes": CONTENT_TYPES,
                "SupportedResponseMIMETypes": RESPONSE_TYPES,
                "SupportedRealtimeInferenceInstanceTypes": [self.options.deploy_instance_type],
                "SupportedTransformInstanceTypes": [self.options.transform_instance_type],
            },
            ModelApprovalStatus=version.approval,
            MetadataProperties={"GeneratedBy": spec.training_job, "CommitId": spec.code_hash, "ProjectId": "bincount"},
            CustomerMetadataProperties=customer_metadata(version),
            Domain="COMPUTER_VISION",
            Task="IMAGE_CLASSIFICATION",
            ClientToken=token,
            Tags=resource_tags(spec.flow_run_id, model_group=version.group, model_version=version.version),
        )
        return {ARN_KEY: answer["ModelPackageArn"]}

    def set_approval(self, version: ModelVersion, approval: ApprovalStatus, reason: str) -> None:
        arn = version.mirror.get(ARN_KEY)
        if not arn:
            raise RegistryError(
                f"{version.ref} was never registered in SageMaker Model Registry: register the same model again "
                "(the registry then publishes it) and repeat the approval"
            )
        logger.info("setting %s (%s) to %s in SageMaker", version.ref, arn, approval)
        self.client.update_model_package(
            ModelPackageArn=arn, ModelApprovalStatus=approval, ApprovalDescription=reason[:1024]
        )
