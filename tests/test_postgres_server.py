"""The team server of docs/OPERATIONS.md: Prefect on a real PostgreSQL server (Debian's `postgresql` package), with a
deployment run through it by a process worker. Skips, saying why, where PostgreSQL's binaries are absent."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from conftest import PREFECT, free_port, started_prefect_server
from test_deployments import run
from waiting import wait_until

from bincount.demo_data import generate_demo_bucket
from bincount.storage import Storage

POSTGRES_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def as_postgres_user() -> dict:
    """Popen arguments that run PostgreSQL as its own user when the tests run as root (it refuses root)."""
    if os.geteuid() != 0:
        return {}
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as (it refuses root)")
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of its own (a fresh cluster in a temporary folder, on a free loopback port, trust
    authentication); yields the SQLAlchemy URL of its database ``prefect`` for Prefect."""
    if not POSTGRES_BIN:
        pytest.skip(
            "PostgreSQL's server binaries are not installed (/usr/lib/postgresql/*/bin/initdb): "
            "apt-get install -y postgresql (.ci/run does where apt works)"
        )
    binaries = Path(POSTGRES_BIN[-1]).parent
    user = as_postgres_user()
    folder = Path(tempfile.mkdtemp(prefix="bincount-postgres-"))  # not under pytest's root-only tmp folder
    data = folder / "data"
    if user:
        os.chown(folder, user["user"], user["group"])
    port = free_port()
    subprocess.run(
        [binaries / "initdb", "-D", data, "-U", "bincount", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
        timeout=120,
        **user,
    )
    server = subprocess.Popen(
        [binaries / "postgres", "-D", data, "-p", str(port), "-c", "listen_addresses=127.0.0.1",
         "-c", "unix_socket_directories=", "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **user,
    )  # fmt: skip
    try:
        wait_until(lambda: accepts(port), timeout_s=60, what="PostgreSQL to accept connections")
        asyncio.run(create_database(port, "prefect"))
        yield f"postgresql+asyncpg://bincount@127.0.0.1:{port}/prefect"
    finally:
        server.send_signal(signal.SIGINT)  # "fast" shutdown
        try:
            server.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                server.kill()
            shutil.rmtree(folder, ignore_errors=True)


async def create_database(port: int, name: str) -> None:
    connection = await wait_for_connection(port, "postgres")
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


async def wait_for_connection(port: int, database: str) -> asyncpg.Connection:
    """PostgreSQL accepts TCP connections a moment before it accepts logins (it is still starting)."""
    for _ in range(120):
        try:
            return await asyncpg.connect(host="127.0.0.1", port=port, user="bincount", database=database)
        except asyncpg.CannotConnectNowError:
            await asyncio.sleep(0.5)
    raise AssertionError("PostgreSQL accepted no login within 60 s")


async def flow_run_names(url: str) -> list[str]:
    """The flow runs as the PostgreSQL database holds them."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    connection = await asyncpg.connect(host="127.0.0.1", port=port, user="bincount", database="prefect")
    try:
        return [row["name"] for row in await connection.fetch("SELECT name FROM flow_run")]
    finally:
        await connection.close()


@pytest.fixture(scope="module")
def postgres_server_env(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` on the PostgreSQL database, as docs/OPERATIONS.md shows it."""
    with started_prefect_server(
        tmp_path_factory.mktemp("prefect-home"), PREFECT_API_DATABASE_CONNECTION_URL=postgres_url
    ) as env:
        yield env


def test_a_deployment_runs_on_a_prefect_server_backed_by_postgresql(
    postgres_server_env: dict[str, str], postgres_url: str, tmp_path: Path
) -> None:
    bucket = (tmp_path / "bucket").as_uri()
    generate_demo_bucket(Storage(), bucket, images=60, seed=2, size=48)
    env = {
        **postgres_server_env,
        "BINCOUNT_DATA_DIR": str(tmp_path / "raw"),
        "BINCOUNT_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
    }
    run([sys.executable, "-m", "deployments.setup"], env)
    run([PREFECT, "deploy", "--name", "prepare-data/on-demand"], env)
    location = json.dumps({"source_uri": bucket})
    started = run([PREFECT, "deployment", "run", "prepare-data/on-demand", "--param", f"location={location}"], env)
    run([PREFECT, "worker", "start", "--pool", "bincount-local", "--run-once"], env, timeout=300)
    (flow_run,) = httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json={}, timeout=10).json()
    assert flow_run["state_type"] == "COMPLETED", flow_run["state"]["message"]
    assert (tmp_path / "artifacts" / "datasets" / "abid" / "split.csv").is_file()
    (name,) = asyncio.run(flow_run_names(postgres_url))
    assert name in started, "the run is a row of the PostgreSQL database"
