"""What a run cost: a training job's SageMaker billed seconds priced from the dated table (spot savings too), a tuning
job's trials summed, an endpoint's instance hours so far, and a price table that cannot be read refused with what to
do."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from bincount.contracts.naming import job_name
from bincount.contracts.serving import EndpointRecord
from bincount.contracts.training import JobCost, TrainingJob
from bincount.contracts.tuning import SEEDS_SEARCH_SPACE, TrialSpec, TuningSpec
from bincount.local.tuning import LocalTuningBackend
from bincount.sagemaker.costs import endpoint_cost
from bincount.sagemaker.training import PRICES_ENV, job_cost, job_record, price_table
from sm_scripts.metric_format import OBJECTIVE_METRIC

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


def test_a_tuning_jobs_cost_sums_its_trials_and_refuses_mixed_instances() -> None:
    prices = {"source": "test table", "per_instance_hour": {"ml.g5.xlarge": 1.2}}
    trials = [job_cost({**SPOT_JOB, "BillableTimeInSeconds": s, "TrainingTimeInSeconds": s}, prices) for s in (60, 90)]
    total = JobCost.total(trials)
    assert total is not None and (total.billed_s, total.jobs, total.instance_count) == (300, 2, 2)
    assert total.usd == pytest.approx(300 / 3600 * 1.2) and total.on_demand_usd == total.usd
    assert total.summary() == "$0.10 (2 x ml.g5.xlarge, 300 instance-s billed over 2 jobs)"
    assert JobCost.total([]) is None
    unpriced = job_cost({**SPOT_JOB, "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 2}}, {})
    assert JobCost.total([trials[0], unpriced]).usd is None  # a sum is priced only if every job is
    other = job_cost({**SPOT_JOB, "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 2}}, prices)
    with pytest.raises(ValueError, match="different instances"):
        JobCost.total([trials[0], other])
    local = [JobCost(billed_s=120, unit="cpu-seconds"), JobCost(billed_s=60, unit="cpu-seconds")]
    assert JobCost.total(local).summary() == "3.0 CPU minutes (local over 2 jobs)"


def endpoint_record(backend: str = "sagemaker", replicas: int = 2, **details: object) -> EndpointRecord:
    return EndpointRecord(
        name="bincount",
        url="https://runtime.sagemaker.us-east-1.amazonaws.com/endpoints/bincount/invocations",
        model_uri="s3://bucket/model.tar.gz",
        version="0123456789ab",
        arch="resnet18",
        image_size=64,
        classes=[1, 2, 3, 4, 5],
        backend=backend,
        deployed_at="2026-12-07T18:00:00+00:00",
        replicas=replicas,
        details={"instance_type": "ml.m5.large", **details},
    )


def test_endpoint_hours_so_far_are_priced_per_instance_since_the_config_went_in_service() -> None:
    now = dt.datetime(2026, 12, 7, 21, 30, tzinfo=dt.UTC)
    prices = {"source": "test table", "per_instance_hour": {"ml.m5.large": 0.1}}
    cost = endpoint_cost(endpoint_record(), now, prices)
    assert cost is not None and (cost.instances, cost.hours) == (2, 3.5)
    assert cost.usd == pytest.approx(2 * 3.5 * 0.1) and cost.price_source == "test table"
    assert cost.summary() == "$0.70 (2 x ml.m5.large for 3.5 h since 2026-12-07T18:00:00+00:00)"
    assert "no price for ml.m5.large" in endpoint_cost(endpoint_record(), now, {}).summary()
    serverless = endpoint_cost(endpoint_record(serverless={"memory_mb": 2048, "max_concurrency": 5}), now, prices)
    assert serverless is not None and serverless.usd is None and "billed per request" in serverless.summary()
    assert endpoint_cost(endpoint_record(backend="local"), now, prices) is None


def test_a_local_search_reports_its_trials_cpu_minutes_and_leaves_failed_ones_out() -> None:
    spec = TuningSpec(
        name=job_name("tune", "cost", kind="tuning"),
        space=SEEDS_SEARCH_SPACE,
        static_hyperparameters={},
        channels={"train": "file:///t", "valid": "file:///v"},
        output_uri="file:///jobs",
        max_jobs=3,
        max_parallel_jobs=3,
        objective_metric=OBJECTIVE_METRIC,
    )

    def run_trials(trials: list[TrialSpec]) -> list[TrainingJob | BaseException]:
        return [
            RuntimeError("boom")
            if trial.number == 1
            else TrainingJob(
                name=trial.job.name,
                status="Completed",
                hyperparameters={},
                metrics={OBJECTIVE_METRIC: 0.5},
                cost=JobCost(billed_s=60.0 * (trial.number + 1), unit="cpu-seconds"),
            )
            for trial in trials
        ]

    cost = LocalTuningBackend().tune(spec, run_trials).cost
    assert cost is not None and (cost.billed_s, cost.jobs) == (60 + 180, 2)
    assert cost.summary() == "4.0 CPU minutes (local over 2 jobs)"
