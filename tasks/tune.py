"""Tasks: one tuning trial (a training job that may stop early), and the tuning report."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from bincount.config import Settings
from bincount.training import TrainingJob, TrainingJobSpec, get_training_backend
from bincount.training.plots import tuning_trials
from bincount.sagemaker.tuning import TuningSpec, get_tuning_backend
from bincount.training.tuning import TrialResult, TrialSpec, median_stop_check
from tasks.artifacts import publish_plot
from tasks.caching import TRAINING_JOB_CACHE
from tasks.retry import is_transient
from tasks.train import TRAINING_SLOTS, log_line


@task(name="train-trial", task_run_name="train-trial-{trial.number}", cache_policy=TRAINING_JOB_CACHE, persist_result=True)
def train_trial_task(settings: Settings, spec: TrainingJobSpec, trial: TrialSpec, objective_metric: str, direction: str) -> TrainingJob:
    """Run one trial's job; it stops early when its objective falls below the median of earlier trials.

    Not retried: a trial that fails is recorded as failed and the search goes on without it.
    """
    logger = get_run_logger()
    logger.info("Trial %d: %s (prune below %s)", trial.number, trial.hyperparameters, trial.prune_below or "nothing yet")
    with concurrency(TRAINING_SLOTS, occupy=1):
        job = get_training_backend(settings).train(
            spec, on_log=log_line(logger), should_stop=median_stop_check(trial.prune_below, objective_metric, direction)
        )
    logger.info("Trial %d %s: %s", trial.number, job.status, job.metrics.get(objective_metric))
    return job


@task(name="report-tuning", cache_policy=NO_CACHE)
def report_tuning_task(results: list[TrialResult], objective_metric: str) -> list[dict]:
    """The leaderboard (table artifact ``tuning-leaderboard``) and a plot of the trials (``tuning-trials``)."""
    logger = get_run_logger()
    logger.info("Reporting %d trials", len(results))
    rows = [
        {
            "rank": rank,
            "trial": result.number,
            "status": result.status,
            objective_metric: None if result.objective is None else round(result.objective, 4),
            **result.hyperparameters,
            "job": result.job_name,
            "failure": result.failure_reason,
        }
        for rank, result in enumerate(results, start=1)
    ]
    create_table_artifact(key="tuning-leaderboard", table=rows, description=f"Tuning trials ranked by {objective_metric}")
    publish_plot("tuning-trials", tuning_trials(results, objective_metric), "Tuning trials", f"Objective: {objective_metric}")
    return rows


@task(
    name="run-tuning-job",
    retries=2,
    retry_delay_seconds=[30, 120],
    retry_condition_fn=is_transient,
    cache_policy=NO_CACHE,  # the tuning job's name is per flow run: a retry follows the same job
)
def run_tuning_job_task(settings: Settings, spec: TuningSpec) -> list[TrialResult]:
    """Run the whole search as one SageMaker tuning job (profile ``aws``); returns its trials, best first."""
    logger = get_run_logger()
    logger.info("Tuning job %s: %d trials, %d at a time", spec.name, spec.max_jobs, spec.max_parallel_jobs)
    result = get_tuning_backend(settings).tune(spec, on_event=logger.info)
    logger.info("Best training job %s: %s = %s", result.best_training_job, spec.objective_metric, result.best_objective)
    ranked = sorted(result.trials, key=lambda trial: (trial.objective is None, -(trial.objective or 0.0)))
    return ranked
