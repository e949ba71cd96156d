"""The SageMaker serving backend: PyTorchModel endpoints and Transformer batch transforms.

A deploy is SageMaker's own blue/green::

    model.tar.gz ─► Model (inference.py repacked in) ─► EndpointConfig ─► CreateEndpoint / UpdateEndpoint
                                                                              │ wait InService, smoke invoke
                             UpdateEndpoint back to the previous config ◄─ failed, timed out or answered badly

Model and endpoint-config names are derived from what they hold (weights, code, instance
settings), so a retried deploy finds what the first attempt created and only waits. An update
that fails is rolled back to the previous config (SageMaker keeps the old fleet when the new one
does not start; this also covers a timeout and a bad answer); a new endpoint that fails never
served, so it is left for a look and the error says how to delete it.
A deploy with a strategy guards the update (``bincount/sagemaker/guardrails.py``: traffic shifted all
at once, as a canary or in linear steps, rolled back by SageMaker itself when the project's alarms
fire), or puts the new model beside the current one as a shadow variant; ``scaling`` registers
Application Auto Scaling target tracking for the production variant.
Records (model URI, version, configs) live at ``{artifact_root}/endpoints/<name>.json``, as the
local backend keeps them. A batch transform writes ``<key>.out`` per image under the output
prefix, as the local one does, and its results are read back into the same joined table.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import tempfile
from dataclasses import asdict, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from bincount.batch_results import list_inputs, load_labels, write_tables
from bincount.capture import capture_prefix
from bincount.code import INFERENCE_ENTRY_POINT, SM_SCRIPTS_DIR, code_hash
from bincount.config import Settings
from bincount.contracts.naming import (
    check_endpoint_name,
    check_name,
    job_name,
    short_hash,
)
from bincount.contracts.serving import (
    BatchTransformSummary,
    CaptureConfig,
    DeployError,
    EndpointNotFoundError,
    EndpointRecord,
    EndpointVariant,
    ProgressFn,
    Rollout,
    RolloutStep,
    RolloutStrategy,
    RolloutVerdict,
    ScalingConfig,
    ServingError,
    ShadowReport,
    ShadowVariant,
    TrafficStats,
    check_answer,
)
from bincount.endpoints import EndpointRecords, recorded_capture, shadow_verdict, smoke_image
from bincount.models import fetch_model
from bincount.registry import now_iso
from bincount.sagemaker.guardrails import (
    SHADOW_VARIANT,
    VARIANT,
    Guardrails,
    TrafficSteps,
    bake_total_s,
    check_strategy,
    deployment_config,
    traffic_steps,
)
from bincount.sagemaker.serverless import capacity, check_serverless
from bincount.sagemaker.session import (
    RETRIES,
    SageMakerBackendBase,
    SageMakerOptions,
    require_s3,
    resource_tags,
)
from bincount.sagemaker.waiting import (
    ENDPOINT,
    TRANSFORM_JOB,
    TRANSFORM_LOG_GROUP,
    LogFollower,
    SageMakerJobFailed,
    SageMakerWaitTimeout,
    describe_or_none,
    is_not_found,
    wait_for,
)
from bincount.storage import join_uri, storage_for
from sm_scripts.model_dir import read_model_info

logger = logging.getLogger(__name__)

JSON = "application/json"
IMAGE = "application/x-image"


def replaced_model(stored: EndpointRecord | None, version: str) -> tuple[str | None, str | None, str | None]:
    """The (model URI, version, ref) a deploy of ``version`` replaces; a retried deploy of the same weights keeps
    what they replaced."""
    if stored is None:
        return None, None, None
    if stored.version != version:
        return stored.model_uri, stored.version, stored.model_ref
    return stored.previous_model_uri, stored.previous_version, stored.previous_model_ref


ROLLOUT_STEPS: dict[str, tuple[str, int]] = {  # verdict: the step it makes, and the new model's share after it
    "started": ("started", 100),
    "completed": ("promoted", 100),
    "rolled-back": ("rolled-back", 0),
    "promoted": ("promoted", 100),
    "stopped": ("stopped", 0),
}


def rollout(
    strategy: RolloutStrategy, verdict: RolloutVerdict, reason: str, report: ShadowReport | None = None, **facts: Any
) -> Rollout:
    """The record's rollout: one step (SageMaker moves the traffic itself), and ``facts`` SageMaker's own (the
    DeploymentConfig, the alarms' baseline, the traffic steps in instances)."""
    action, percent = ROLLOUT_STEPS.get(verdict, ("shadow", strategy.traffic_percent))
    step = RolloutStep(now_iso(), action, percent, reason=reason)
    return Rollout(strategy, verdict, reason, (step,), report, {key: value for key, value in facts.items() if value})


def smoke_request(image_size: int) -> bytes:
    """A synthetic bin photo as inference.py's JSON request (base64): a text body that any
    SageMaker-compatible runtime carries intact (moto's test server, for one, rejects binary bodies)."""
    return json.dumps({"image": base64.b64encode(smoke_image(image_size)).decode()}).encode()


class SageMakerServingBackend(SageMakerBackendBase):
    """Endpoints and batch transforms on SageMaker, behind :class:`bincount.contracts.serving.ServingBackend`.

    ``run_key`` names the flow run (the batch-transform task passes its flow run's id); transform
    job names hash it with the request, so a retried task finds its job and a new run starts its own.
    """

    def __init__(
        self,
        settings: Settings,
        options: SageMakerOptions | None = None,
        session: Any = None,
        cache_dir: Path | None = None,
        run_key: str = "",
    ) -> None:
        super().__init__(settings, options, session)
        self.storage = storage_for(settings)
        self.records = EndpointRecords(settings, self.storage)
        self.cache_dir = cache_dir or Path(tempfile.gettempdir()) / "bincount-sagemaker-models"
        self.run_key = run_key

    @property
    def client(self) -> Any:
        return self.session.sagemaker_client

    def tags(self, endpoint: str | None, model_ref: str | None, version: str) -> list[dict[str, str]]:
        """:func:`resource_tags` of what a deploy or transform creates: the flow run (``run_key``, where given), the
        endpoint, the registry's model group and version (``model_ref``, ``<group>:<version>``) and the weights'."""
        group, _, number = (model_ref or "").partition(":")
        return resource_tags(
            self.run_key or None,
            endpoint=endpoint,
            model_group=group or None,
            model_version=number or None,
            model_weights=version,
        )

    # models --------------------------------------------------------------------------------
    def ensure_model(
        self, model_uri: str, version: str, instance_type: str, tags: list[dict[str, str]] | None = None
    ) -> str:
        """The SageMaker Model serving ``model_uri`` with inference.py on ``instance_type``; created if absent, with
        ``tags`` (default: :meth:`tags` without an endpoint or model group)."""
        from sagemaker.pytorch import PyTorchModel

        identity = (model_uri, code_hash(), self.options.framework_version, self.options.py_version, instance_type)
        name = check_name(f"bincount-model-{version}-{short_hash(*identity, length=8)}", "model")
        try:
            self.client.describe_model(ModelName=name)
            return name
        except ClientError as error:
            if not is_not_found(error):
                raise
        logger.info("creating model %s from %s", name, model_uri)
        PyTorchModel(
            model_data=require_s3(model_uri, "model URI"),
            role=self.options.require_role(),
            entry_point=INFERENCE_ENTRY_POINT,
            source_dir=str(SM_SCRIPTS_DIR),
            framework_version=self.options.framework_version,
            py_version=self.options.py_version,
            name=name,
            code_location=join_uri(self.options.base_uri(self.settings), "models"),
            sagemaker_session=self.session,
        ).create(instance_type=instance_type, tags=tags or self.tags(None, None, version))
        return name

    def _model(self, model_uri: str) -> tuple[dict[str, Any], str]:
        model_dir, version = fetch_model(self.storage, require_s3(model_uri, "model URI"), self.cache_dir)
        return read_model_info(model_dir), version

    def data_capture_config(self, capture: CaptureConfig) -> dict[str, Any] | None:
        """SageMaker's DataCaptureConfig: it writes
        ``<artifact_root>/data-capture/<endpoint>/<variant>/yyyy/mm/dd/hh/``, the layout the local router writes,
        in the same format (inputs base64, JSON answers as JSON)."""
        if not capture.enabled:
            return None
        if not self.settings.artifact_root.startswith("s3://"):
            raise DeployError(
                f"data capture on SageMaker writes to S3, but the artifact root is {self.settings.artifact_root}: "
                "set BINCOUNT_ARTIFACT_ROOT=s3://<bucket>/<prefix>, or deploy with sampling_percentage=0"
            )
        return {
            "EnableCapture": True,
            "InitialSamplingPercentage": capture.sampling_percentage,
            "DestinationS3Uri": self.settings.artifact_uri("data-capture"),
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"], "CsvContentTypes": ["text/csv"]},
        }

    def ensure_endpoint_config(
        self,
        endpoint_name: str,
        model_name: str,
        capture: CaptureConfig | None = None,
        count: int | None = None,
        shadow: tuple[str, int] | None = None,
        tags: list[dict[str, str]] | None = None,
    ) -> str:
        """The endpoint config serving ``model_name`` on ``count`` instances (default: the options'), with the
        ``(model name, percent)`` ``shadow`` copying that share of requests beside it; created if absent, with
        ``tags`` (default: the project's, the flow run's and the endpoint's)."""
        count, instance_type = count or self.options.deploy_instance_count, self.options.deploy_instance_type
        capture_config = self.data_capture_config(capture or CaptureConfig())
        key = (
            [model_name, instance_type, str(count)]
            + ([json.dumps(capture_config, sort_keys=True)] if capture_config else [])
            + ([shadow[0], str(shadow[1])] if shadow else [])
            + ([json.dumps(self.options.serverless(), sort_keys=True)] if self.options.serverless() else [])
        )
        name = check_name(f"{endpoint_name[:40]}-{short_hash(*key)}", "endpoint-config")
        try:
            self.client.describe_endpoint_config(EndpointConfigName=name)
            return name
        except ClientError as error:
            if not is_not_found(error):
                raise

        def variant(variant_name: str, model: str, weight: float) -> dict[str, Any]:
            return {
                "VariantName": variant_name,
                "ModelName": model,
                **capacity(self.options.serverless(), instance_type, count),
                "InitialVariantWeight": weight,
            }

        request: dict[str, Any] = {
            "EndpointConfigName": name,
            "ProductionVariants": [variant(VARIANT, model_name, 1.0)],
            "Tags": tags or resource_tags(self.run_key or None, endpoint=endpoint_name),
        }
        if shadow:  # the shadow's weight over the production variant's is the share of requests copied to it
            request["ShadowProductionVariants"] = [variant(SHADOW_VARIANT, shadow[0], shadow[1] / 100)]
        if capture_config:
            request["DataCaptureConfig"] = capture_config
        self.client.create_endpoint_config(**request)
        return name

    @cached_property
    def guardrails(self) -> Guardrails:
        """CloudWatch alarms and metrics, and Application Auto Scaling, on the session's boto3 session."""
        boto = self.session.boto_session
        return Guardrails(
            boto.client("cloudwatch", config=RETRIES), boto.client("application-autoscaling", config=RETRIES)
        )

    def _instance_count(self, scaling: ScalingConfig | None) -> int:
        return scaling.min_replicas if scaling else self.options.deploy_instance_count

    # records -------------------------------------------------------------------------------
    def describe(self, name: str) -> EndpointRecord:
        """The record (:meth:`shadow_report` says how a shadow does)."""
        check_endpoint_name(name)
        record = self.records.read(name)
        if describe_or_none(self.client, ENDPOINT, name) is None:
            raise EndpointNotFoundError(f"SageMaker has no endpoint named {name!r}")
        if record is None:
            raise EndpointNotFoundError(
                f"endpoint {name!r} exists on SageMaker but has no record at {self.records.uri(name)}: deploy it "
                "with bincount"
            )
        return record

    def shadow_report(self, name: str) -> ShadowReport:
        """Both variants' CloudWatch metrics since the shadow started, and whether to promote the shadow (the
        local backend's report and rule: :func:`bincount.endpoints.shadow_verdict`).

        Agreement is not measured on SageMaker: it needs both variants' answers to the same requests.
        """
        record, shadow, strategy = self._shadowed(name)
        start, end = dt.datetime.fromisoformat(shadow.started_at), dt.datetime.now(dt.UTC)
        try:
            production = self.guardrails.variant_metrics(record.name, VARIANT, start, end)
            candidate = self.guardrails.variant_metrics(record.name, SHADOW_VARIANT, start, end)
        except ClientError as error:
            none = TrafficStats()
            reason = f"CloudWatch did not answer: {error}"
            return ShadowReport(none, none, 0, None, 0, promote=False, reason=reason, since=shadow.started_at)
        return shadow_verdict(production, candidate, strategy, since=shadow.started_at)

    # deploy --------------------------------------------------------------------------------
    def deploy(
        self,
        name: str,
        model_uri: str,
        model_ref: str | None = None,
        capture: CaptureConfig | None = None,
        strategy: RolloutStrategy | None = None,
        scaling: ScalingConfig | None = None,
    ) -> EndpointRecord:
        """Create ``name`` on ``model_uri``, or update it to a new endpoint config; smoke-invoke it.

        ``capture`` and ``scaling`` None keep the endpoint's recorded settings (for a new endpoint: capture off,
        ``deploy_instance_count`` instances). ``strategy`` None is a plain UpdateEndpoint (SageMaker's
        blue/green, all at once); all-at-once, canary and linear add a DeploymentConfig whose bakes the
        project's alarms watch (module :mod:`bincount.sagemaker.guardrails`): a rollback SageMaker makes
        when one fires is returned, with ``rollout.verdict == "rolled-back"`` and the record of the
        model that still serves. A shadow adds the model as the endpoint's shadow variant.

        Raises:
            DeployError: the strategy is outside SageMaker's limits, or a shadow's classes differ (nothing was
                changed); or the endpoint did not come up in time, came up failed or answered badly.
                An updated endpoint has been rolled back to its previous config (the message says
                so, or, if even that failed, what to run); a new one is left as it is, and the
                message says how to delete it.
            ValueError: a serverless endpoint (``serverless_memory_mb``) was asked for what SageMaker serverless
                lacks (data capture, a strategy, autoscaling); nothing was changed.
        """
        check_endpoint_name(name)
        if strategy is not None:
            check_strategy(strategy)
        info, version = self._model(model_uri)
        stored = self.records.read(name)
        capture = capture or recorded_capture(stored)
        scaling = scaling or (stored.scaling if stored else None)
        check_serverless(self.options.serverless(), capture, strategy, scaling)
        current = describe_or_none(self.client, ENDPOINT, name)
        if strategy is not None and strategy.kind == "shadow" and current is not None:
            return self._start_shadow(
                name,
                model_uri,
                model_ref,
                info=info,
                version=version,
                stored=stored,
                current=current,
                capture=capture,
                strategy=strategy,
                scaling=scaling,
            )
        count = self._instance_count(scaling)
        # A canary or linear update of a serving endpoint runs as many instances as its share needs (checked before
        # anything changes), and goes back to ``count`` after.
        steps = traffic_steps(strategy, count, self.options.rollout_max_instances) if strategy and current else None
        tags = self.tags(name, model_ref, version)
        model_name = self.ensure_model(model_uri, version, self.options.deploy_instance_type, tags)
        config_name = self.ensure_endpoint_config(
            name, model_name, capture, steps.instances if steps else count, tags=tags
        )
        current = self._settled(name, current)
        previous_config: str | None = None
        guard: dict[str, Any] | None = None
        if current is None:
            logger.info("creating endpoint %s with config %s", name, config_name)
            self.session.create_endpoint(endpoint_name=name, config_name=config_name, tags=tags, wait=False)
        elif current["EndpointConfigName"] == config_name:
            logger.info("endpoint %s already uses config %s (a retried deploy): waiting for it", name, config_name)
            if stored is not None:
                recorded = stored.details.get("endpoint_config")
                previous_config = (
                    recorded if recorded != config_name else stored.details.get("previous_endpoint_config")
                )
        else:
            previous_config = current["EndpointConfigName"]
            guard = self._update(name, previous_config, config_name, stored, strategy, steps)
        rolled_back: dict[str, Any] | None = None
        try:
            description = self._wait(name, guard["bakes_s"] if guard else 0)
            # SageMaker rolled a guarded update back by itself: the old config serves, InService
            state = (description["EndpointStatus"], description["EndpointConfigName"])
            rolled_back = guard if state == ("InService", previous_config) else None
            if rolled_back is None:
                self._check_serving(name, description, config_name, int(info["image_size"]), info["classes"])
        except (ServingError, ClientError, SageMakerWaitTimeout) as error:
            raise self._failed(name, f"model {model_uri} (version {version})", error, previous_config, stored) from None
        if rolled_back is not None:
            return self._rolled_back(name, stored, rolled_back, description)
        previous = replaced_model(stored, version)
        record = EndpointRecord(
            name=name,
            url=f"{self.session.sagemaker_runtime_client.meta.endpoint_url}/endpoints/{name}/invocations",
            model_uri=model_uri,
            version=version,
            arch=str(info["arch"]),
            image_size=int(info["image_size"]),
            classes=[int(c) for c in info["classes"]],
            backend="sagemaker",
            deployed_at=now_iso(),
            previous_model_uri=previous[0],
            previous_version=previous[1],
            model_ref=model_ref,
            previous_model_ref=previous[2],
            scaling=scaling,
            capture=capture if capture.enabled else None,
            capture_uri=capture_prefix(self.settings.artifact_root, name) if capture.enabled else None,
            replicas=count,
            variants=(EndpointVariant(VARIANT, version, model_ref, 100, replicas=count),),
            rollout=rollout(
                strategy or RolloutStrategy(),
                "started" if previous_config is None else "completed",
                "no model was serving: the endpoint starts on this one"
                if previous_config is None
                else "no alarm fired during the bakes"
                if guard
                else "the new model answered its smoke request",
                deployment_config=guard["deployment_config"] if guard else None,
                baseline=guard["baseline"] if guard else None,
                traffic_steps=steps.to_dict() if steps else None,
            ),
            details={
                "endpoint_arn": description.get("EndpointArn"),
                "endpoint_config": config_name,
                "previous_endpoint_config": previous_config,
                "model_name": model_name,
                "instance_type": self.options.deploy_instance_type,
                "serverless": self.options.serverless(),
                "alarms": guard["alarms"] if guard else (stored.details.get("alarms") if stored else None),
            },
        )
        self.records.write(record)
        self._scale_back(name, steps)
        if scaling is not None:
            self.guardrails.apply_scaling(name, scaling)
        logger.info("endpoint %s serves model %s (version %s)", name, model_uri, version)
        return record

    def _scale_back(self, name: str, steps: TrafficSteps | None) -> None:
        """After an update that ran more instances for its traffic share (``steps.raised``): the endpoint's own
        count again.

        Raises:
            DeployError: the new model serves, but on the raised count; the message says what to run.
        """
        if steps is None or not steps.raised:
            return
        logger.info("endpoint %s: back from %d to %d instances after the rollout", name, steps.instances, steps.serving)
        try:
            self.client.update_endpoint_weights_and_capacities(
                EndpointName=name,
                DesiredWeightsAndCapacities=[{"VariantName": VARIANT, "DesiredInstanceCount": steps.serving}],
            )
            settled = self._wait(name)
            if settled["EndpointStatus"] != "InService":
                raise ServingError(f"it is {settled['EndpointStatus']}: {settled.get('FailureReason')}")
        except (ServingError, ClientError, SageMakerWaitTimeout) as error:
            raise DeployError(
                f"endpoint {name!r} serves the new model, but scaling it back from the rollout's {steps.instances} "
                f"instances to {steps.serving} failed ({error}); it bills for {steps.instances} until you run `aws "
                f"sagemaker update-endpoint-weights-and-capacities --endpoint-name {name} --desired-weights-and-"
                f"capacities VariantName={VARIANT},DesiredInstanceCount={steps.serving}`"
            ) from None

    def _update(
        self,
        name: str,
        previous_config: str,
        config_name: str,
        stored: EndpointRecord | None,
        strategy: RolloutStrategy | None,
        steps: TrafficSteps | None = None,
    ) -> dict[str, Any] | None:
        """UpdateEndpoint to ``config_name``; guarded by the endpoint's alarms for a traffic-shifting ``strategy``
        moving ``steps`` (returned: the strategy, the alarms, their baseline, the DeploymentConfig, how long its
        bakes take and when it started)."""
        request: dict[str, Any] = {"EndpointName": name, "EndpointConfigName": config_name}
        recorded = stored.scaling if stored else None
        if recorded is not None and recorded.autoscaling and not (steps and steps.raised):
            # Keep the instances autoscaling has added; a rollout that needs more instances gets its config's count.
            request["RetainAllVariantProperties"] = True
        guard = None
        if strategy is not None and strategy.kind != "shadow":
            alarms, baseline = self.guardrails.ensure_alarms(name, strategy)
            request["DeploymentConfig"] = deployment_config(strategy, alarms, steps)
            guard = {
                "bakes_s": bake_total_s(strategy, steps),
                "strategy": strategy,
                "alarms": alarms,
                "baseline": asdict(baseline),
                "deployment_config": request["DeploymentConfig"],
                "since": dt.datetime.now(dt.UTC),
            }
        logger.info("updating endpoint %s from config %s to %s (%s)", name, previous_config, config_name, strategy)
        self.client.update_endpoint(**request)
        return guard

    def _settled(self, name: str, current: dict[str, Any] | None) -> dict[str, Any] | None:
        """``current`` once no other change of the endpoint is running; raises DeployError for a Failed one."""
        if current is not None and current["EndpointStatus"] not in ENDPOINT.final:
            logger.info("endpoint %s is %s (another deploy?): waiting for it first", name, current["EndpointStatus"])
            current = self._wait(name)
        if current is not None and current["EndpointStatus"] == "Failed":
            raise DeployError(
                f"endpoint {name!r} is Failed ({current.get('FailureReason')}), and SageMaker allows nothing but "
                "deleting a "
                f"failed endpoint: delete it with `BINCOUNT_PROFILE=aws bincount delete-endpoint {name}`, then "
                "deploy again"
            )
        return current

    def _check_serving(
        self, name: str, description: dict[str, Any], config_name: str, image_size: int, classes: list[Any]
    ) -> None:
        """Raises ServingError unless ``name`` is InService on ``config_name`` and answers a smoke request."""
        if description["EndpointStatus"] != "InService" or description["EndpointConfigName"] != config_name:
            raise ServingError(
                f"it is {description['EndpointStatus']} on config {description['EndpointConfigName']}: "
                f"{description.get('FailureReason') or 'no FailureReason given'}"
            )
        check_answer(self.invoke(name, smoke_request(image_size), JSON), [int(c) for c in classes])

    def _failed(
        self, name: str, what: str, error: Exception, previous_config: str | None, stored: EndpointRecord | None
    ) -> DeployError:
        """The error of a change of ``name`` that failed, after rolling an update back to ``previous_config``."""
        failed = f"{what} failed on endpoint {name!r}: {error}"
        if previous_config is None:
            return DeployError(self._left_new_endpoint(name, failed))
        self._roll_back(name, previous_config, failed)
        version_back = (
            None
            if stored is None
            else (
                stored.version if stored.details.get("endpoint_config") == previous_config else stored.previous_version
            )
        )
        serves = f" (model version {version_back})" if version_back else ""
        return DeployError(
            f"{failed}. Rolled back: endpoint {name!r} serves its previous config {previous_config}{serves} again. "
            f"Look at the endpoint's log (CloudWatch group /aws/sagemaker/Endpoints/{name}), fix the model, then "
            "deploy again."
        )

    def _rolled_back(
        self,
        name: str,
        stored: EndpointRecord | None,
        guard: dict[str, Any],
        description: dict[str, Any],
    ) -> EndpointRecord:
        """SageMaker rolled a guarded update back: the record of the model that still serves, with the verdict."""
        strategy: RolloutStrategy = guard["strategy"]
        fired = self.guardrails.fired(guard["alarms"], guard["since"])
        reason = "; ".join(
            [f"alarm {alarm}" for alarm in fired]
            + ([f"SageMaker: {description['FailureReason']}"] if description.get("FailureReason") else [])
        )
        reason = reason or "SageMaker rolled the update back and gave no reason"
        logger.warning("the %s update of endpoint %s rolled back: %s", strategy.kind, name, reason)
        if stored is None:
            raise DeployError(
                f"the {strategy.kind} update of endpoint {name!r} rolled back ({reason}), and the endpoint has no "
                f"record at {self.records.uri(name)}: deploy its model with bincount to record it"
            )
        record = replace(
            stored,
            details={**stored.details, "alarms": guard["alarms"]},
            rollout=rollout(
                strategy,
                "rolled-back",
                reason,
                baseline=guard["baseline"],
                deployment_config=description.get("LastDeploymentConfig") or guard["deployment_config"],
            ),
        )
        self.records.write(record)
        return record

    # shadow --------------------------------------------------------------------------------
    def _start_shadow(
        self,
        name: str,
        model_uri: str,
        model_ref: str | None,
        *,
        info: dict[str, Any],
        version: str,
        stored: EndpointRecord | None,
        current: dict[str, Any],
        capture: CaptureConfig,
        strategy: RolloutStrategy,
        scaling: ScalingConfig | None,
    ) -> EndpointRecord:
        """Put ``model_uri`` beside the serving model as the shadow variant of ``name``."""
        if stored is None:
            raise DeployError(
                f"endpoint {name!r} exists on SageMaker but has no record at {self.records.uri(name)}: deploy a model "
                "to it with bincount first, then its shadow"
            )
        classes = [int(c) for c in info["classes"]]
        if classes != stored.classes:
            raise DeployError(
                f"the shadow model {model_uri} counts {classes}, but endpoint {name!r} serves a model counting "
                f"{stored.classes}: their answers cannot be compared. Nothing was changed; shadow a model trained on "
                "the same classes, or deploy this one with another strategy"
            )
        current = self._settled(name, current)
        assert current is not None
        tags = self.tags(name, model_ref, version)
        shadow_model = self.ensure_model(model_uri, version, self.options.deploy_instance_type, tags)
        config_name = self.ensure_endpoint_config(
            name,
            stored.details["model_name"],
            capture,
            self._instance_count(scaling),
            shadow=(shadow_model, strategy.traffic_percent),
            tags=tags,
        )
        previous_config = current["EndpointConfigName"]
        if previous_config == config_name:  # a retried shadow deploy: only wait
            previous_config = stored.details.get("previous_endpoint_config")
        else:
            logger.info("endpoint %s: shadow variant with model %s on config %s", name, model_uri, config_name)
            self._update(name, previous_config, config_name, stored, None)
        try:
            description = self._wait(name)
            self._check_serving(name, description, config_name, stored.image_size, stored.classes)
        except (ServingError, ClientError, SageMakerWaitTimeout) as error:
            raise self._failed(
                name, f"shadow model {model_uri} (version {version})", error, previous_config, stored
            ) from None
        count = self._instance_count(scaling)
        record = replace(
            stored,
            details={**stored.details, "endpoint_config": config_name, "previous_endpoint_config": previous_config},
            capture=capture if capture.enabled else None,
            capture_uri=capture_prefix(self.settings.artifact_root, name) if capture.enabled else None,
            shadow=ShadowVariant(
                variant=SHADOW_VARIANT,
                model_uri=model_uri,
                version=version,
                model_ref=model_ref,
                percent=strategy.traffic_percent,
                started_at=now_iso(),
                backend={"model_name": shadow_model},
            ),
            variants=(
                EndpointVariant(VARIANT, stored.version, stored.model_ref, 100, replicas=count),
                EndpointVariant(SHADOW_VARIANT, version, model_ref, 0, strategy.traffic_percent, count),
            ),
            rollout=rollout(
                strategy,
                "shadowing",
                f"{strategy.traffic_percent}% of requests are copied to model version {version}; users' answers still "
                f"come from version {stored.version}",
            ),
            replicas=count,
            scaling=scaling,
        )
        self.records.write(record)
        if scaling is not None:
            self.guardrails.apply_scaling(name, scaling)
        return record

    def _shadowed(self, name: str) -> tuple[EndpointRecord, ShadowVariant, RolloutStrategy]:
        check_endpoint_name(name)
        record = self.records.read(name)
        if record is None or record.shadow is None or record.rollout is None:
            raise ServingError(
                f"endpoint {name!r} has no shadow: deploy a model to it with strategy kind 'shadow' first"
            )
        return record, record.shadow, record.rollout.strategy

    def promote_shadow(self, name: str) -> EndpointRecord:
        """The shadow's model becomes the one that answers (a plain update from the shadow config; a failure
        rolls back to the shadow config, where the current model still answers)."""
        return self._end_shadow(name, promote=True)

    def stop_shadow(self, name: str) -> EndpointRecord:
        """Drop the shadow variant: the current model's own config again."""
        return self._end_shadow(name, promote=False)

    def _end_shadow(self, name: str, promote: bool) -> EndpointRecord:
        stored, shadow, strategy = self._shadowed(name)
        report = self.shadow_report(name)
        kept = (shadow.model_uri, shadow.model_ref) if promote else (stored.model_uri, stored.model_ref)
        record = replace(
            self.deploy(name, *kept),
            rollout=rollout(
                strategy,
                "promoted" if promote else "stopped",
                f"the shadow model version {shadow.version} " + ("answers now" if promote else "was stopped"),
                report,
            ),
        )
        self.records.write(record)
        return record

    def _wait(self, name: str, bakes_s: float = 0) -> dict[str, Any]:
        """Wait for ``name`` to reach a final status (``endpoint_timeout_s`` at most, plus a guarded update's bakes)."""
        return wait_for(
            self.client,
            ENDPOINT,
            name,
            on_event=logger.info,
            timeout_s=self.options.endpoint_timeout_s + bakes_s,
            backoff=self.backoff(),
        )

    def _left_new_endpoint(self, name: str, failed: str) -> str:
        """The error for a new endpoint that failed: it never served, so nothing is rolled back; it is left for
        a look at what went wrong, and the message says how to delete it."""
        current = describe_or_none(self.client, ENDPOINT, name)
        status = current["EndpointStatus"] if current else "gone"
        logger.warning(
            "endpoint %s is new and failed: leaving it (%s) for a look; it bills while it has instances", name, status
        )
        return (
            f"{failed}. The endpoint is new and never served; it is left as it is ({status}) so its log "
            f"(CloudWatch group /aws/sagemaker/Endpoints/{name}) can be read, and it bills while it has instances: "
            f"delete it with `BINCOUNT_PROFILE=aws bincount delete-endpoint {name}`, fix the model, then deploy again."
        )

    def _roll_back(self, name: str, previous_config: str, failed: str) -> None:
        """Put ``previous_config`` back on ``name`` (unless SageMaker already did).

        SageMaker takes no update while one is running: after a timed-out update this first waits
        (``endpoint_timeout_s`` again) for the endpoint to settle.

        Raises:
            DeployError: the endpoint could not be rolled back; the message says what to run.
        """
        by_hand = (
            f"put the previous config back with `aws sagemaker update-endpoint --endpoint-name {name} "
            f"--endpoint-config-name {previous_config}` once the endpoint is InService, or delete it "
            f"(`BINCOUNT_PROFILE=aws bincount delete-endpoint {name}`) and deploy the previous model again"
        )
        status = None
        try:
            current = self._wait(name)
            status = current["EndpointStatus"]
            if current["EndpointConfigName"] == previous_config and status == "InService":
                logger.warning(
                    "endpoint %s is back on config %s (SageMaker rolled the update back)", name, previous_config
                )
                return
            # UpdateRollbackFailed: SageMaker's own rollback failed, and the endpoint serves a mix of both configs; an
            # update to one config settles it. Any other status but InService takes no update (Failed: only a delete).
            if status not in ("InService", "UpdateRollbackFailed"):
                raise ServingError(f"it is {status}: {current.get('FailureReason') or 'no FailureReason given'}")
            logger.warning("rolling endpoint %s (%s) back to config %s", name, status, previous_config)
            self.client.update_endpoint(EndpointName=name, EndpointConfigName=previous_config)
            rolled = self._wait(name)
            status = rolled["EndpointStatus"]
            if status != "InService" or rolled["EndpointConfigName"] != previous_config:
                raise ServingError(f"it is {status}: {rolled.get('FailureReason') or 'no FailureReason given'}")
        except (ServingError, ClientError, SageMakerWaitTimeout) as error:
            if status == "Failed":
                by_hand = (
                    "SageMaker allows nothing but deleting a Failed endpoint, and it serves no model now: delete it "
                    f"with `BINCOUNT_PROFILE=aws bincount delete-endpoint {name}`, then deploy the previous model again"
                )
            raise DeployError(
                f"{failed}. Rolling back to config {previous_config} failed too ({error}): {by_hand}"
            ) from None
        logger.warning("endpoint %s serves config %s again", name, previous_config)

    # invoke, delete ------------------------------------------------------------------------
    def invoke(self, name: str, body: bytes, content_type: str, accept: str = JSON) -> bytes:
        answer = self.session.sagemaker_runtime_client.invoke_endpoint(
            EndpointName=name, Body=body, ContentType=content_type, Accept=accept
        )
        return answer["Body"].read()

    def delete(self, name: str) -> None:
        """Delete the endpoint, its config, its autoscaling and its alarms (models stay: they cost nothing); a
        retried delete finishes the job."""
        check_endpoint_name(name)
        record = self.records.read(name)
        current = describe_or_none(self.client, ENDPOINT, name)
        if current is None and record is None:
            raise EndpointNotFoundError(f"SageMaker has no endpoint named {name!r} and none is recorded")
        scaling = record.scaling if record else None
        if scaling is not None and scaling.autoscaling:
            self.guardrails.apply_scaling(name, ScalingConfig())  # a fixed count: deregistered
        if record is not None and record.details.get("alarms"):
            self.guardrails.delete_alarms(name)
        if current is not None:
            logger.info("deleting endpoint %s", name)
            self.client.delete_endpoint(EndpointName=name)
        config = current["EndpointConfigName"] if current else record.details.get("endpoint_config") if record else None
        if config:
            try:
                self.client.delete_endpoint_config(EndpointConfigName=config)
            except ClientError as error:
                if not is_not_found(error):
                    raise
        if record is not None:
            self.records.delete(name)

    # batch transform -----------------------------------------------------------------------
    def batch_transform(
        self,
        model_uri: str,
        input_uri: str,
        output_uri: str,
        *,
        batch_size: int = 16,
        labels_uri: str | None = None,
        progress: ProgressFn | None = None,
        rescore: bool = False,
    ) -> BatchTransformSummary:
        """A SageMaker transform job over every image under ``input_uri``; the joined table read back.

        ``batch_size`` is the local backend's knob: SageMaker sends ``transform_strategy`` requests of
        at most ``max_payload_mb``, ``max_concurrent_transforms`` at a time per instance (options).
        ``rescore`` is the local backend's too: a transform job always scores (and overwrites) every
        image, so its output never mixes two models.

        Raises:
            BatchTransformError: the prefixes overlap or the input holds no images.
            SageMakerJobFailed: the job failed (SageMaker's FailureReason in the message).
        """
        from sagemaker.transformer import Transformer

        input_uri = require_s3(input_uri, "input URI")
        output_uri = require_s3(output_uri, "output URI")
        keys = list_inputs(self.storage, input_uri, output_uri)
        prefix = input_uri + "/"
        info, version = self._model(model_uri)
        labels = load_labels(self.storage, labels_uri) if labels_uri else None
        options = self.options
        model_name = self.ensure_model(model_uri, version, options.transform_instance_type)
        transform_job = job_name("transform", self.run_key, model_name, input_uri, output_uri, kind="transform")
        if progress:
            progress(0, len(keys))
        if describe_or_none(self.client, TRANSFORM_JOB, transform_job) is not None:
            logger.info("transform job %s exists (an earlier attempt started it): following it", transform_job)
        else:
            logger.info("starting transform job %s over %d images under %s", transform_job, len(keys), input_uri)
            Transformer(
                model_name=model_name,
                instance_count=options.transform_instance_count,
                instance_type=options.transform_instance_type,
                strategy=options.transform_strategy,
                assemble_with=options.assemble_with,
                output_path=output_uri + "/",
                accept=JSON,
                max_concurrent_transforms=options.max_concurrent_transforms,
                max_payload=options.max_payload_mb,
                sagemaker_session=self.session,
            ).transform(
                data=prefix,
                data_type="S3Prefix",
                content_type=IMAGE,
                split_type="None",
                job_name=transform_job,
                wait=False,
                logs=False,
            )
        logs = LogFollower(self.logs_client, TRANSFORM_LOG_GROUP, transform_job, logger.info)
        description = wait_for(
            self.client,
            TRANSFORM_JOB,
            transform_job,
            on_event=logger.info,
            timeout_s=options.job_timeout_s,
            backoff=self.backoff(),
            logs=logs,
        )
        if description["TransformJobStatus"] != "Completed":
            raise SageMakerJobFailed(
                "transform job", transform_job, description["TransformJobStatus"], description.get("FailureReason")
            )
        if progress:
            progress(len(keys), len(keys))
        # a failed image fails the whole SageMaker job: a completed one has no errors to list
        results_uri, _, accuracy = write_tables(
            self.storage,
            output_uri,
            keys,
            labels=labels,
            classes=[int(c) for c in info["classes"]],
            errors=[],
            model_version=version,
        )
        seconds = (description["TransformEndTime"] - description["TransformStartTime"]).total_seconds()
        return BatchTransformSummary(
            input_uri=input_uri,
            output_uri=output_uri,
            model_version=version,
            images=len(keys),
            scored=len(keys),
            skipped=0,
            failed=0,
            seconds=round(seconds, 3),
            images_per_s=round(len(keys) / seconds, 2) if seconds > 0 else 0.0,
            results_uri=results_uri,
            errors_uri=None,
            accuracy=accuracy,
        )
