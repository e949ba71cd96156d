"""Tasks: one tuning trial (a training job that may stop early), and the tuning report."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from bincount.config import Settings
from bincount.contracts.training import TrainingJob
from bincount.contracts.tuning import TrialSpec, TuningResult
from bincount.factory import get_training_backend
from bincount.plots import tuning_trials
from tasks.artifacts import markdown_table, publish_plot
from tasks.caching import TRAINING_JOB_CACHE
from tasks.train import log_line, training_slot


@task(
    name="train-trial", task_run_name="train-trial-{trial.number}", cache_policy=TRAINING_JOB_CACHE, persist_result=True
)
def train_trial_task(settings: Settings, trial: TrialSpec) -> TrainingJob:
    """Run one trial's job; it stops early when its objective falls below the median of earlier trials.

    Not retried: a trial that fails is recorded as failed and the search goes on without it.
    """
    logger = get_run_logger()
    logger.info(
        "Trial %d: %s (prune below %s)", trial.number, trial.hyperparameters, trial.prune_below or "nothing yet"
    )
    with training_slot():
        job = get_training_backend(settings).train(trial.job, on_log=log_line(logger), should_stop=trial.should_stop)
    logger.info("Trial %d %s: %s", trial.number, job.status, job.metrics.get(trial.objective_metric))
    return job


@task(name="report-tuning", cache_policy=NO_CACHE)
def report_tuning_task(result: TuningResult, objective_metric: str) -> None:
    """The leaderboard (table artifact ``tuning-leaderboard``) and a plot of the trials (``tuning-trials``)."""
    logger = get_run_logger()
    logger.info("Reporting %d trials of %s", len(result.trials), result.name)
    names = sorted({name for trial in result.trials for name in trial.hyperparameters})
    rows = [
        [
            rank,
            trial.number,
            trial.status,
            trial.objective,
            *(trial.hyperparameters.get(n) for n in names),
            trial.job_name,
            trial.failure_reason,
        ]
        for rank, trial in enumerate(result.trials, start=1)
    ]
    create_markdown_artifact(
        key="tuning-leaderboard",
        markdown=f"### Tuning trials of {result.name}, best first\n\n"
        + markdown_table(["rank", "trial", "status", objective_metric, *names, "job", "failure"], rows),
        description=f"Tuning trials ranked by {objective_metric}",
    )
    publish_plot(
        "tuning-trials",
        tuning_trials(result.trials, objective_metric),
        "Tuning trials",
        f"Objective: {objective_metric}",
    )
