"""Prepare a Prefect server for this project's deployments in one command (idempotent).

    python -m deployments.setup                 # local: process work pool + training concurrency limit
    python -m deployments.setup --aws --bucket my-bucket [--aws-profile p] [--region eu-west-1]
                                                # also: ECS work pool, AwsCredentials and S3Bucket blocks

Then `prefect deploy --all` reads prefect.yaml, and `prefect worker start --pool bincount-local`
runs what is deployed.
"""

from __future__ import annotations

import argparse

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.workers.process import ProcessWorker

LOCAL_POOL = "bincount-local"
ECS_POOL = "bincount-ecs"
TRAINING_LIMIT = "bincount-training"
"""Global concurrency limit held by every training job (tuning trials, retrains, nightly runs)."""
AWS_CREDENTIALS_BLOCK = "bincount-aws"
RESULTS_BLOCK = "bincount-results"


async def ensure_work_pool(name: str, pool_type: str, base_job_template: dict) -> None:
    async with get_client() as client:
        await client.create_work_pool(
            WorkPoolCreate(name=name, type=pool_type, base_job_template=base_job_template), overwrite=True
        )


async def ensure_training_limit(limit: int) -> None:
    async with get_client() as client:
        await client.upsert_global_concurrency_limit_by_name(TRAINING_LIMIT, limit)


def save_aws_blocks(bucket: str, profile: str | None, region: str | None) -> None:
    """Credentials (the default AWS chain, or a named profile) and the S3 bucket for flow results."""
    from prefect_aws import AwsCredentials, S3Bucket

    credentials = AwsCredentials(profile_name=profile, region_name=region)
    credentials.save(AWS_CREDENTIALS_BLOCK, overwrite=True)
    S3Bucket(bucket_name=bucket, bucket_folder="prefect-results", credentials=credentials).save(
        RESULTS_BLOCK, overwrite=True
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training-slots", type=int, default=1, help="training jobs at once (default: 1)")
    parser.add_argument("--aws", action="store_true", help="also prepare the ECS pool and AWS blocks (default: off)")
    parser.add_argument("--bucket", help="S3 bucket for flow results (required with --aws)")
    parser.add_argument("--aws-profile", help="named AWS profile (default: the default credential chain)")
    parser.add_argument("--region", help="AWS region (default: the profile's)")
    args = parser.parse_args(argv)
    if args.aws and not args.bucket:
        parser.error("--aws needs --bucket: the S3 bucket that will hold flow results")

    run_coro_as_sync(ensure_work_pool(LOCAL_POOL, "process", ProcessWorker.get_default_base_job_template()))
    print(f"work pool {LOCAL_POOL!r} (process) ready")
    run_coro_as_sync(ensure_training_limit(args.training_slots))
    print(f"global concurrency limit {TRAINING_LIMIT!r} = {args.training_slots}")
    if args.aws:
        from prefect_aws.workers import ECSWorker

        run_coro_as_sync(ensure_work_pool(ECS_POOL, "ecs", ECSWorker.get_default_base_job_template()))
        print(f"work pool {ECS_POOL!r} (ecs) ready")
        save_aws_blocks(args.bucket, args.aws_profile, args.region)
        print(f"blocks aws-credentials/{AWS_CREDENTIALS_BLOCK} and s3-bucket/{RESULTS_BLOCK} saved")


if __name__ == "__main__":
    main()
