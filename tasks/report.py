"""Task: the data report (class balance, image sizes, normalization) as Prefect artifacts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from bincount.config import Settings
from bincount.data_report import DataReport, build_data_report, class_count_rows
from bincount.plots import data_report_png
from tasks.artifacts import publish_plot


@task(name="report-data", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def report_data_task(settings: Settings, split_table: pd.DataFrame) -> DataReport:
    """Class counts per split, image sizes and the training split's mean/std, shown in the UI."""
    logger = get_run_logger()
    report = build_data_report(split_table, Path(settings.data_dir))
    logger.info(
        "Training normalization from %d images: mean %s std %s", report.normalization_images, report.mean, report.std
    )
    create_table_artifact(
        key="data-class-counts", table=class_count_rows(report), description="Images per count and split"
    )
    publish_plot(
        "data-report",
        data_report_png(report),
        "Data report",
        f"Normalization (train split, {report.normalization_images} images): mean {report.mean}, std {report.std}. "
        + " ".join(report.notes),
    )
    return report
