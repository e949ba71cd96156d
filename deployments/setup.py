"""Prepare a Prefect server for this project's deployments in one command (idempotent).

    python -m deployments.setup                 # local: process work pool + training concurrency limit
    python -m deployments.setup --aws --bucket my-bucket [--region eu-west-1]
                                                # also: ECS work pool and the S3Bucket block for flow results

Then `prefect deploy --all` reads prefect.yaml, and `prefect worker start --pool bincount-local`
runs what is deployed. Once deployed, the automations (deployments/automations.py):

    python -m deployments.setup --automations --notify-url https://hooks.example.com/bincount [--retune-on-drift]

A notification links to the run in the Prefect UI: at PREFECT_UI_URL, else PREFECT_API_URL without its
/api (the server this command talks to), else --ui-url; with none of them it says so and creates nothing.
"""

from __future__ import annotations

import argparse

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.settings import get_current_settings
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.workers.process import ProcessWorker

from deployments.automations import AutomationSetupError, create_automations
from tasks.train import TRAINING_SLOTS

LOCAL_POOL = "bincount-local"
ECS_POOL = "bincount-ecs"
RESULTS_BLOCK = "bincount-results"
"""S3Bucket block the AWS deployments keep flow results in (PREFECT_DEFAULT_RESULT_STORAGE_BLOCK)."""


async def ensure_work_pool(name: str, pool_type: str, base_job_template: dict) -> None:
    async with get_client() as client:
        await client.create_work_pool(
            WorkPoolCreate(name=name, type=pool_type, base_job_template=base_job_template), overwrite=True
        )


async def ensure_training_limit(limit: int) -> None:
    async with get_client() as client:
        await client.upsert_global_concurrency_limit_by_name(TRAINING_SLOTS, limit)


def save_results_block(bucket: str, region: str | None) -> None:
    """The S3 bucket for flow results. It holds no keys and no profile: whoever reads it (the ECS
    task's role, a developer's shell) brings credentials from the default AWS chain, as the tasks do."""
    from prefect_aws import AwsCredentials, S3Bucket

    credentials = AwsCredentials(region_name=region)
    block = S3Bucket(bucket_name=bucket, bucket_folder="prefect-results", credentials=credentials)
    block.save(RESULTS_BLOCK, overwrite=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training-slots", type=int, default=1, help="training jobs at once (default: 1)")
    parser.add_argument("--aws", action="store_true", help="also the ECS pool and the results block (default: off)")
    parser.add_argument("--bucket", help="S3 bucket for flow results (required with --aws)")
    parser.add_argument("--region", help="AWS region of the bucket (default: the default chain's)")
    parser.add_argument("--automations", action="store_true", help="create the automations (after `prefect deploy`)")
    parser.add_argument(
        "--notify-url", help="webhook that failure and missed-run notifications POST to (default: none)"
    )
    parser.add_argument(
        "--ui-url",
        help="the Prefect UI's address that notifications link runs to "
        "(default: PREFECT_UI_URL, else PREFECT_API_URL without /api)",
    )
    parser.add_argument(
        "--retune-on-drift", action="store_true", help="drift starts a nightly run that tunes again (default: off)"
    )
    parser.add_argument(
        "--nightly-missed-after-h",
        type=float,
        default=26.0,
        help="notify when no nightly completed within (default: 26)",
    )
    args = parser.parse_args(argv)
    if args.aws and not args.bucket:
        parser.error("--aws needs --bucket: the S3 bucket that will hold flow results")

    run_coro_as_sync(ensure_work_pool(LOCAL_POOL, "process", ProcessWorker.get_default_base_job_template()))
    print(f"work pool {LOCAL_POOL!r} (process) ready")
    run_coro_as_sync(ensure_training_limit(args.training_slots))
    print(f"global concurrency limit {TRAINING_SLOTS!r} = {args.training_slots}")
    if args.aws:
        from prefect_aws.workers import ECSWorker

        run_coro_as_sync(ensure_work_pool(ECS_POOL, "ecs", ECSWorker.get_default_base_job_template()))
        print(f"work pool {ECS_POOL!r} (ecs) ready")
        save_results_block(args.bucket, args.region)
        print(f"block s3-bucket/{RESULTS_BLOCK} saved")
    if args.automations:
        try:
            ui_url = args.ui_url or get_current_settings().ui_url
            names = create_automations(
                args.notify_url, args.retune_on_drift, args.nightly_missed_after_h, ui_url=ui_url
            )
        except AutomationSetupError as error:
            parser.error(str(error))
        notes = (
            f" (notifications link runs at {ui_url.rstrip('/')}/runs/flow-run/<id>)"
            if args.notify_url
            else " (no --notify-url: no notifications)"
        )
        print(f"automations ready: {', '.join(names)}{notes}")


if __name__ == "__main__":
    main()
