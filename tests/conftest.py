"""Shared fixtures: a Prefect server, an S3 API on loopback, the real ABID sample, demo channels."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from bincount.demo_data import write_demo_channels
from bincount.loopback_s3 import LoopbackS3

ABID_DIR = Path(
    os.environ.get("BINCOUNT_ABID_SAMPLE", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "abid")
)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real Prefect server (SQLite, on loopback) for every flow and task run in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LoopbackS3]:
    """moto's S3 API over HTTP on loopback; tests use their own bucket names."""
    with LoopbackS3() as server:
        yield server


@pytest.fixture
def s3_client(s3_server: LoopbackS3):
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")


@pytest.fixture(scope="session")
def abid_dir() -> Path:
    """The real ABID sample; tests that need it skip when it is absent."""
    if not (ABID_DIR / "file_list.sample.json").is_file():
        pytest.skip(
            f"the real ABID sample is not at {ABID_DIR} (set BINCOUNT_ABID_SAMPLE to its folder; see README: Tests)"
        )
    return ABID_DIR


@pytest.fixture(scope="session")
def demo_channels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny train/valid/test channels (64 px synthetic photos, 8 per count per split)."""
    return write_demo_channels(tmp_path_factory.mktemp("channels"), per_class=8, size=64, seed=0)


ABID_BUCKET = "abid-sample"
ABID_PER_CLASS = 60


@pytest.fixture(scope="session")
def abid_bucket(abid_dir: Path, s3_server: LoopbackS3) -> dict[str, int]:
    """A public-read bucket on the loopback S3 API laid out like s3://aft-vbi-pds, holding 60 real
    images per count (with metadata) and their manifest at ``file_list.json``; returns that manifest."""
    from bincount.manifest import dump_manifest, parse_manifest

    sample = parse_manifest((abid_dir / "file_list.sample.json").read_text())
    manifest: dict[str, int] = {}
    for count in sorted(set(sample.values())):
        manifest.update(
            list((image_id, label) for image_id, label in sample.items() if label == count)[:ABID_PER_CLASS]
        )
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    client.create_bucket(Bucket=ABID_BUCKET)
    for image_id in manifest:
        for folder, suffix in (("bin-images", "jpg"), ("metadata", "json")):
            path = abid_dir / "bucket" / folder / f"{image_id}.{suffix}"
            client.upload_file(
                str(path), ABID_BUCKET, f"{folder}/{image_id}.{suffix}", ExtraArgs={"ACL": "public-read"}
            )
    client.put_object(Bucket=ABID_BUCKET, Key="file_list.json", Body=dump_manifest(manifest), ACL="public-read")
    return manifest
