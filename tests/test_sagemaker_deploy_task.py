"""The deploy tasks (tasks/deploy.py) on profile ``aws``: in a Prefect flow against SageMaker's API on loopback (moto),
as the pipeline and the CLI run them. The endpoint's artifact and events are made from the record the SageMaker
backend writes, read the same way as a local endpoint's."""

from __future__ import annotations

import os
import uuid

import pytest
from prefect import flow
from prefect.artifacts import Artifact
from sagemaker_moto import MotoSageMaker, prediction, queue_answers

from bincount.config import Settings
from bincount.contracts.serving import EndpointRecord, RolloutStrategy
from tasks.deploy import deploy_endpoint_task, end_shadow_task, endpoint_artifact_key, stop_endpoint_task


@flow(name="sagemaker-deploy-for-test")
def deploy_flow(
    settings: Settings, endpoint_name: str, model_uri: str, model_ref: str, strategy: RolloutStrategy | None = None
) -> EndpointRecord:
    return deploy_endpoint_task(settings, endpoint_name, model_uri, model_ref, strategy=strategy)


@flow(name="sagemaker-end-shadow-for-test")
def end_shadow_flow(settings: Settings, endpoint_name: str, promote: bool) -> EndpointRecord:
    return end_shadow_task(settings, endpoint_name, promote)


@flow(name="sagemaker-stop-for-test")
def stop_flow(settings: Settings, endpoint_name: str) -> EndpointRecord | None:
    return stop_endpoint_task(settings, endpoint_name)


def artifact(name: str) -> str:
    found = Artifact.get(endpoint_artifact_key(name))
    assert found is not None and isinstance(found.data, str)
    return found.data


def test_deploy_shadow_and_stop_tasks_on_sagemaker_publish_the_endpoint(
    prefect_server: None,
    sagemaker_env: Settings,
    models: dict[int, str],
    moto_sagemaker: MotoSageMaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for service in ("CLOUDWATCH", "AUTOSCALING"):  # a shadow's report reads CloudWatch: moto's, on loopback
        monkeypatch.setenv(f"BINCOUNT_SAGEMAKER_{service}_ENDPOINT_URL", os.environ["BINCOUNT_SAGEMAKER_ENDPOINT_URL"])
    name = f"bincount-task-{uuid.uuid4().hex[:8]}"
    queue_answers(prediction(2))
    first = deploy_flow(sagemaker_env, name, models[1], "g:1")
    assert first.backend == "sagemaker" and first.model_ref == "g:1"
    page = artifact(name)
    assert f"### Endpoint `{name}`: serving" in page
    assert "| `AllTraffic` | `g:1` | 100% | 1 |" in page, "the variants table, as SageMaker runs them"
    assert "Last rollout: all-at-once: **started**" in page

    # A shadow beside it: the artifact shows both variants and what the shadow gets.
    queue_answers(prediction(2))
    shadowing = deploy_flow(sagemaker_env, name, models[2], "g:2", RolloutStrategy("shadow", traffic_percent=25))
    assert shadowing.version == first.version
    page = artifact(name)
    assert "| `Shadow` | `g:2` | 0% (shadow: a copy of 25%) | 1 |" in page
    assert "**shadowing**" in page

    queue_answers(prediction(2))
    stopped = end_shadow_flow(sagemaker_env, name, promote=False)
    assert stopped.version == first.version and stopped.shadow is None
    assert "**stopped**" in artifact(name)

    last = stop_flow(sagemaker_env, name)
    assert last is not None and last.model_ref == "g:1"
    assert f"### Endpoint `{name}`: stopped" in artifact(name)
