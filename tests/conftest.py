"""Shared fixtures: a Prefect server, an S3 API on loopback, the real ABID sample, demo channels."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import httpx
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import strict_requests
from sagemaker_moto import BUCKET, REGION, ROLE, MotoSageMaker, model_archive
from waiting import wait_until

from bincount.config import Settings
from bincount.demo_data import write_demo_channels
from bincount.loopback_s3 import LoopbackS3
from bincount.sagemaker.session import SageMakerOptions

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
    """The real ABID sample; tests that need it skip when it is absent, or fail where it is
    expected (``BINCOUNT_REQUIRE_ABID=1``, as CI sets it when ``../shared/data/abid`` exists)."""
    if not (ABID_DIR / "file_list.sample.json").is_file():
        message = (
            f"the real ABID sample is not at {ABID_DIR} (set BINCOUNT_ABID_SAMPLE to its folder; see "
            "docs/DEVELOPMENT.md, Tests)"
        )
        if os.environ.get("BINCOUNT_REQUIRE_ABID") == "1":
            pytest.fail(f"{message}; BINCOUNT_REQUIRE_ABID=1 says it must be there", pytrace=False)
        pytest.skip(message)
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
        manifest.update([(image_id, label) for image_id, label in sample.items() if label == count][:ABID_PER_CLASS])
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


@pytest.fixture(autouse=True)
def strict_request_check() -> Iterator[list[str]]:
    """Every SageMaker, CloudWatch and Application Auto Scaling request of every test, checked against its service
    model's maximums, patterns and enums (tests/strict_requests.py): one that breaks a rule fails the test."""
    with strict_requests.checking() as broken:
        yield broken


# --- SageMaker on loopback (moto), shared by the SageMaker test modules ----------------------------
@pytest.fixture
def moto_sagemaker(monkeypatch: pytest.MonkeyPatch) -> MotoSageMaker:
    return MotoSageMaker(monkeypatch)


@pytest.fixture(scope="module")
def bucket(s3_server: LoopbackS3) -> str:
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name=REGION)
    client.create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture
def settings(s3_server: LoopbackS3, bucket: str) -> Settings:
    return Settings.load(
        profile="aws",
        artifact_root=f"s3://{bucket}/bincount",
        s3_endpoint_url=s3_server.endpoint_url,
        aws_region=REGION,
    )


@pytest.fixture
def options(s3_server: LoopbackS3) -> SageMakerOptions:
    return SageMakerOptions.load(
        role_arn=ROLE,
        endpoint_url=s3_server.endpoint_url,
        runtime_endpoint_url=s3_server.endpoint_url,
        logs_endpoint_url=s3_server.endpoint_url,
        poll_initial_s=0.01,
        poll_max_s=0.05,
    )


@pytest.fixture
def sagemaker_env(monkeypatch: pytest.MonkeyPatch, settings: Settings, options: SageMakerOptions) -> Settings:
    """The ``aws`` profile as environment variables, for the backends the factories build."""
    for name, value in {
        "BINCOUNT_SAGEMAKER_ROLE_ARN": ROLE,
        "BINCOUNT_SAGEMAKER_ENDPOINT_URL": options.endpoint_url,
        "BINCOUNT_SAGEMAKER_RUNTIME_ENDPOINT_URL": options.runtime_endpoint_url,
        "BINCOUNT_SAGEMAKER_LOGS_ENDPOINT_URL": options.logs_endpoint_url,
        "BINCOUNT_SAGEMAKER_POLL_INITIAL_S": "0.01",
        "BINCOUNT_SAGEMAKER_POLL_MAX_S": "0.05",
    }.items():
        monkeypatch.setenv(name, str(value))
    return settings


@pytest.fixture
def models(settings: Settings) -> dict[int, str]:
    s3 = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=REGION)
    uris = {}
    for seed in (1, 2, 3):
        key = f"bincount/models/{uuid.uuid4().hex}/model.tar.gz"
        s3.put_object(Bucket=BUCKET, Key=key, Body=model_archive(seed))
        uris[seed] = f"s3://{BUCKET}/{key}"
    return uris


# --- a Prefect server of its own, reached over its CLI and API (deployments, workers, automations) ---
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def started_prefect_server(home: Path, **settings: str) -> Iterator[dict[str, str]]:
    """`prefect server start` with its own home (and any other Prefect settings, e.g. a database URL) on a free
    loopback port, until the block ends; yields the environment that reaches it."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **settings,
    }
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def healthy() -> bool:
        assert server.poll() is None, "prefect server start exited"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout_s=120, interval_s=0.5, what="the Prefect server to answer /api/health")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def server_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A dedicated Prefect server (its own home and SQLite database) and the environment to reach it."""
    with started_prefect_server(tmp_path_factory.mktemp("prefect-home")) as env:
        yield env


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A webhook receiver on loopback: its URL and the JSON bodies POSTed to it."""
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
