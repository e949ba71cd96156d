"""What a training job cost: SageMaker's billed seconds priced from the dated table (spot savings too), and a
price table that cannot be read refused with what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bincount.sagemaker.training import PRICES_ENV, job_cost, job_record, price_table

SPOT_JOB = {
    "TrainingJobName": "bincount-train-spot",
    "TrainingJobStatus": "Completed",
    "OutputDataConfig": {"S3OutputPath": "s3://bucket/jobs"},
    "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 2, "VolumeSizeInGB": 30},
    "TrainingTimeInSeconds": 900,
    "BillableTimeInSeconds": 300,
}


def test_a_spot_job_is_priced_by_its_billed_seconds_and_says_what_spot_saved() -> None:
    cost = job_cost(SPOT_JOB, {"source": "test table", "per_instance_hour": {"ml.g5.xlarge": 1.2}})
    assert cost.billed_s == 600 and cost.instance_count == 2
    assert cost.usd == pytest.approx(600 / 3600 * 1.2) and cost.on_demand_usd == pytest.approx(1800 / 3600 * 1.2)
    assert cost.summary() == "$0.20 (2 x ml.g5.xlarge, 600 instance-s billed; spot saved $0.40)"
    assert cost.price_source == "test table"


def test_an_instance_type_missing_from_the_table_is_named_not_priced_at_zero() -> None:
    cost = job_cost(SPOT_JOB, {"per_instance_hour": {}})
    assert cost.usd is None and "no price for ml.g5.xlarge" in cost.summary()


def test_the_job_record_carries_its_cost_from_the_packaged_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRICES_ENV, raising=False)
    table = price_table()
    assert "ml.g5.xlarge" in table["per_instance_hour"] and "2026" in table["source"]
    job = job_record(SPOT_JOB, {})
    hourly = table["per_instance_hour"]["ml.g5.xlarge"]
    assert job.cost is not None and job.cost.usd == pytest.approx(600 / 3600 * hourly, abs=1e-4)  # to 1/100 cent


def test_a_price_table_given_by_the_environment_wins_and_a_broken_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = tmp_path / "prices.json"
    ours.write_text(json.dumps({"source": "ours", "per_instance_hour": {"ml.g5.xlarge": 2.0}}))
    monkeypatch.setenv(PRICES_ENV, str(ours))
    assert job_record(SPOT_JOB, {}).cost.usd == pytest.approx(600 / 3600 * 2.0, abs=1e-4)
    ours.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{PRICES_ENV}=.*prices.json is not a readable JSON price table"):
        price_table()
