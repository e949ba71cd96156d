"""Debugger and profiler on SageMaker without the Debugger service (closed to new customers on 2026-07-30).

By default a training job's request carries no Debugger configuration: train.py's own smdebug hook and
torch.profiler write into ``SM_OUTPUT_DATA_DIR``, which SageMaker packs into the job's ``output.tar.gz``,
and the project's rules run on that archive after the job. Here the job's output is made the way
SageMaker makes it: the real train.py, run with the flags and ``SM_*`` layout of the captured
CreateTrainingJob request (``/opt/ml`` mapped to a scratch folder), its ``SM_OUTPUT_DATA_DIR`` packed as
``output.tar.gz`` where SageMaker puts it on the loopback S3.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from sagemaker_moto import BUCKET, Captured, MotoSageMaker, decoded

from bincount.code import SM_SCRIPTS_DIR, TRAIN_ENTRY_POINT
from bincount.config import Settings
from bincount.contracts.naming import job_name
from bincount.contracts.training import TrainingJob, TrainingJobSpec
from bincount.local.training import hyperparameter_flags, sagemaker_environment
from bincount.models import pack_folder
from bincount.sagemaker.session import SageMakerOptions
from bincount.sagemaker.training import SageMakerTrainingBackend
from bincount.storage import storage_for

TINY = {"arch": "resnet18", "image-size": 32, "batch-size": 16, "optimizer": "adamw", "lr": 0.001, "epochs": 3}
RULES = {"loss_not_decreasing", "overfit", "overtraining", "vanishing_gradient", "poor_weight_initialization"}
SERVICE_FIELDS = ("DebugHookConfig", "DebugRuleConfigurations", "ProfilerRuleConfigurations", "TensorBoardOutputConfig")


def retrain_spec(settings: Settings, name: str) -> TrainingJobSpec:
    return TrainingJobSpec(
        name=name,
        hyperparameters=TINY,
        channels={split: settings.artifact_uri("channels", split) for split in ("train", "valid")},
        output_uri=settings.artifact_uri("jobs"),
        debugger=True,
        profiler=True,
    )


def run_as_sagemaker(request: dict[str, Any], channels: dict[str, Path], opt_ml: Path) -> Path:
    """Run train.py as SageMaker's training toolkit would for ``request``: its hyperparameters as flags (SageMaker's
    own ``sagemaker_*`` ones left out), ``/opt/ml`` at ``opt_ml``; the folder SageMaker packs as output.tar.gz."""
    hyperparameters = {
        name: str(value).replace("/opt/ml", str(opt_ml)) if isinstance(value, str) else value
        for name, value in decoded(request["HyperParameters"]).items()
        if not name.startswith("sagemaker_")
    }
    environment = sagemaker_environment(opt_ml, channels, hyperparameters, cpus=1)
    for folder in ("model", "output/data"):
        (opt_ml / folder).mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, TRAIN_ENTRY_POINT, *hyperparameter_flags(hyperparameters)],
        cwd=SM_SCRIPTS_DIR,
        env={**os.environ, **environment, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return opt_ml / "output" / "data"


def put_job_output(settings: Settings, request: dict[str, Any], output_data: Path, scratch: Path) -> str:
    """``output_data`` packed and put where SageMaker leaves a job's output: ``<S3OutputPath>/<job>/output/``."""
    uri = f"{request['OutputDataConfig']['S3OutputPath'].rstrip('/')}/{request['TrainingJobName']}/output/output.tar.gz"
    storage_for(settings).upload_file(pack_folder(output_data, scratch / "output.tar.gz"), uri)
    return uri


def test_a_retrain_request_has_no_debugger_service_configuration_by_default(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    backend = SageMakerTrainingBackend(settings, options)
    captured = Captured(backend.session.sagemaker_client)
    name = job_name("retrain", uuid.uuid4().hex)
    job = backend.train(retrain_spec(settings, name))

    (request,) = captured("CreateTrainingJob")
    assert [field for field in SERVICE_FIELDS if field in request] == []
    assert request["ProfilerConfig"] == {"DisableProfiler": True}  # the documented switch that keeps monitoring off
    flags = decoded(request["HyperParameters"])
    assert {key: flags.get(key) for key in ("debugger", "profile", "debugger-dir", "debugger-save-interval")} == {
        "debugger": True,
        "profile": True,
        "debugger-dir": "/opt/ml/output/data/tensors",  # inside SM_OUTPUT_DATA_DIR: packed into output.tar.gz
        "debugger-save-interval": options.debugger_save_interval,
    }
    assert job.debug_output_uri is None
    assert job.output_uri == f"{settings.artifact_uri('jobs')}/{name}/output/output.tar.gz"


def test_the_debugger_service_only_with_the_option(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker
) -> None:
    backend = SageMakerTrainingBackend(settings, options.model_copy(update={"sagemaker_debugger": True}))
    captured = Captured(backend.session.sagemaker_client)
    name = job_name("retrain", uuid.uuid4().hex)
    job = backend.train(retrain_spec(settings, name))

    (request,) = captured("CreateTrainingJob")
    assert {"DebugHookConfig", "DebugRuleConfigurations"} <= set(request)
    assert request["ProfilerConfig"]["ProfilingIntervalInMilliseconds"] == options.system_monitor_interval_ms
    assert "debugger-dir" not in request["HyperParameters"]  # the service's hook config decides where tensors go
    assert job.debug_output_uri == f"{settings.artifact_uri('jobs')}/{name}/debug-output"


def test_rules_and_profile_come_from_the_jobs_own_output_on_both_artifacts(
    prefect_server: None,
    sagemaker_env: Settings,
    moto_sagemaker: MotoSageMaker,
    demo_channels: dict[str, Path],
    tmp_path: Path,
) -> None:
    from prefect import flow
    from prefect.artifacts import Artifact

    from bincount.factory import get_training_backend
    from tasks.train import check_debugger_rules_task, summarize_profile_task

    backend = get_training_backend(sagemaker_env)
    assert isinstance(backend, SageMakerTrainingBackend)
    captured = Captured(backend.session.sagemaker_client)
    name = job_name("retrain", uuid.uuid4().hex)
    job = backend.train(retrain_spec(sagemaker_env, name))
    (request,) = captured("CreateTrainingJob")
    output_data = run_as_sagemaker(request, {k: demo_channels[k] for k in ("train", "valid")}, tmp_path / "opt-ml")
    assert put_job_output(sagemaker_env, request, output_data, tmp_path) == job.output_uri
    with tarfile.open(fileobj=io.BytesIO(storage_for(sagemaker_env).read_bytes(job.output_uri))) as archive:
        names = archive.getnames()
    assert "profiler_summary.json" in names and any(n.startswith("tensors/") for n in names)

    @flow
    def check_job(settings: Settings, job: TrainingJob) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        rules = check_debugger_rules_task(settings, job)
        return [rule.to_dict() for rule in rules], summarize_profile_task(settings, job)

    rules, profile = check_job(sagemaker_env, job)
    assert {rule["rule"] for rule in rules} == RULES
    verdicts = {rule["rule"]: rule for rule in rules}
    assert verdicts["loss_not_decreasing"]["status"] == "passed", verdicts["loss_not_decreasing"]["evidence"]
    assert verdicts["vanishing_gradient"]["status"] == "passed"
    assert all(rule["processing_job_arn"] is None for rule in rules)  # no SageMaker rule job ran: ours did
    assert profile["steps"] > 0 and profile["top_operators"]
    debugger_rules, profiler_summary = Artifact.get("debugger-rules"), Artifact.get("profiler-summary")
    assert debugger_rules is not None and debugger_rules.description.startswith(f"Debugger rules on {name}:")
    assert "loss_not_decreasing" in debugger_rules.data and "processing job" not in debugger_rules.data
    assert profiler_summary is not None and profiler_summary.description == f"Profiler summary of {name}"
    assert json.loads(json.dumps(profile))["device"] == "cpu"


def test_a_job_without_tensors_says_how_to_get_them(
    settings: Settings, options: SageMakerOptions, moto_sagemaker: MotoSageMaker, tmp_path: Path
) -> None:
    backend = SageMakerTrainingBackend(settings, options)
    captured = Captured(backend.session.sagemaker_client)
    name = job_name("train", uuid.uuid4().hex)
    job = backend.train(
        TrainingJobSpec(name, TINY, {"train": settings.artifact_uri("ch")}, settings.artifact_uri("jobs"))
    )
    (request,) = captured("CreateTrainingJob")
    output_data = tmp_path / "data"
    output_data.mkdir()
    (output_data / "history.json").write_text("[]")
    put_job_output(settings, request, output_data, tmp_path)
    assert BUCKET in job.output_uri
    with pytest.raises(ValueError, match=rf"holds no tensors/ folder: job {name} .*Train with debugger=True"):
        backend.rule_results(job)
