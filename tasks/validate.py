"""Task: validate the dataset before anything trains on it (report artifact and gate)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE

from bincount.config import Settings
from bincount.storage import ObjectNotFoundError, join_uri, storage_for
from bincount.validation import (
    DataValidationError,
    ValidationReport,
    ValidationThresholds,
    previous_statistics,
    validate_dataset,
)


@task(name="validate-data", cache_policy=INPUTS + TASK_SOURCE, persist_result=True)
def validate_data_task(
    settings: Settings, split_table: pd.DataFrame, dataset_uri: str, thresholds: ValidationThresholds
) -> ValidationReport:
    """Run the checks; on a pass keep this version's statistics for the next run's shift check, on a failure stop.

    Raises:
        DataValidationError: naming each failed check and its images.
    """
    logger = get_run_logger()
    storage = storage_for(settings)
    accepted_uri = join_uri(dataset_uri, "validation.json")
    try:
        previous = previous_statistics(storage.read_bytes(accepted_uri))
    except ObjectNotFoundError:
        previous = None
    logger.info(
        "Validating %d images (%s)",
        len(split_table),
        "against the last accepted version" if previous else "first version",
    )
    report = validate_dataset(split_table, Path(settings.data_dir), previous, thresholds)
    create_table_artifact(
        key="data-validation",
        table=[
            {
                "check": c.check,
                "result": "pass" if c.passed else "FAIL",
                "message": c.message,
                "images": ", ".join(c.images[:20]),
            }
            for c in report.checks
        ],
        description="Data validation: " + ("passed" if report.passed else "FAILED"),
    )
    if not report.passed:
        raise DataValidationError(report.failure_message())
    storage.write_bytes(accepted_uri, json.dumps(report.to_dict()).encode())
    return report
