"""The local serving backend: endpoints as processes on this machine, batch transform in-process.

Per endpoint::

    client ──► router (stable port: the endpoint URL) ──► model host (a port of its own)

A deploy is blue/green: it starts a new host, waits for ``/ping``, sends it one smoke invocation,
then repoints the router (SIGHUP), waits until the old host has no request in flight and stops it
(SIGTERM: it drains). A new model that fails any step is stopped and the old one keeps serving.
Both processes are detached, so an endpoint outlives the flow run that deployed it. Records
(name, URL, model URI, version, processes) live at ``{artifact_root}/endpoints/<name>.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import httpx
from botocore import UNSIGNED

from bincount.batch_results import load_labels
from bincount.capture import capture_prefix
from bincount.config import Settings
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.serving import (
    BatchTransformSummary,
    CaptureConfig,
    DeployError,
    EndpointNotFoundError,
    EndpointRecord,
    ProgressFn,
    ServingError,
    check_answer,
)
from bincount.endpoints import EndpointRecords, now_iso, recorded_capture, smoke_image
from bincount.local.batch import run_batch_transform
from bincount.local.host import HostOptions
from bincount.local.httpio import listening_socket
from bincount.models import fetch_model
from bincount.storage import Storage, atomic_write_bytes, file_lock, local_path, storage_for
from sm_scripts.model_dir import read_model_info

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def runtime_client(endpoint_url: str, max_attempts: int = 3):
    """The one factory for ``sagemaker-runtime`` clients pointed at a local endpoint (unsigned)."""
    config = botocore.config.Config(
        signature_version=UNSIGNED,
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        read_timeout=120,
        max_pool_connections=64,
    )
    return boto3.session.Session().client(
        "sagemaker-runtime", endpoint_url=endpoint_url, region_name="us-east-1", config=config
    )


class LocalServingBackend:
    """Endpoints as local processes (router + model host); batch transform in this process."""

    def __init__(
        self,
        settings: Settings,
        host_options: HostOptions | None = None,
        runtime_root: Path | None = None,
        bind_host: str = "127.0.0.1",
        start_timeout_s: float = 120.0,
    ) -> None:
        self.settings = settings
        self.storage: Storage = storage_for(settings)
        self.records = EndpointRecords(settings, self.storage)
        self.host_options = host_options or HostOptions()
        if runtime_root is None:
            runtime_root = (
                local_path(settings.artifact_root) / "serving"
                if settings.artifact_root.startswith("file://")
                else Path.home() / ".cache" / "bincount" / "serving"
            )
        self.runtime_root = runtime_root
        self.bind_host = bind_host
        self.start_timeout_s = start_timeout_s
        self._children: dict[int, subprocess.Popen] = {}

    # records -------------------------------------------------------------------------------
    def describe(self, name: str) -> EndpointRecord:
        record = self.records.read(name)
        if record is None:
            raise EndpointNotFoundError(f"no endpoint named {name!r} is recorded at {self.records.uri(name)}")
        return record

    def is_serving(self, record: EndpointRecord) -> bool:
        """Whether the router at the record's URL answers for this endpoint."""
        return self._router_status(record.url, record.name) is not None

    # deploy --------------------------------------------------------------------------------
    def deploy(
        self, name: str, model_uri: str, model_ref: str | None = None, capture: CaptureConfig | None = None
    ) -> EndpointRecord:
        """Blue/green deploy; ``capture`` None keeps the endpoint's current capture setting (off for a new one)."""
        check_endpoint_name(name)
        workdir = self.runtime_root / name
        workdir.mkdir(parents=True, exist_ok=True)
        with file_lock(workdir / ".deploy.lock"):  # one deploy or delete of an endpoint at a time
            try:
                current = self.describe(name)
            except EndpointNotFoundError:
                current = None
            model_dir, version = fetch_model(self.storage, model_uri, self.runtime_root / "models")
            info = read_model_info(model_dir)
            host_proc, host_url = self._start_host(name, model_dir, version, workdir)
            try:
                self._wait_until_ready(host_proc, host_url, workdir / f"host-{host_proc.pid}.log")
                check_answer(
                    self._post(host_url, smoke_image(int(info["image_size"]))), [int(c) for c in info["classes"]]
                )
            except ServingError as error:
                self._stop(host_proc.pid)
                raise DeployError(
                    f"model {model_uri} (version {version}) did not pass its checks, "
                    f"so endpoint {name!r} was left as it was: {error}"
                ) from None
            capture = capture or recorded_capture(current)
            state = {
                "target": host_url,
                "version": version,
                "model_uri": model_uri,
                "model_ref": model_ref,
                "capture": self._capture_state(name, capture),
            }
            if current is not None and self.is_serving(current):
                details = self._switch(current, host_proc.pid, state, workdir)
                url = current.url
            else:
                if current is not None:  # recorded but down (e.g. after a reboot): bring it back at its URL
                    self._stop(current.details.get("host_pid"))
                port = current.details["router_port"] if current is not None else 0
                details = self._start_router(name, port, state, workdir, host_proc.pid)
                url = f"http://{self.bind_host}:{details['router_port']}"
            record = EndpointRecord(
                name=name,
                url=url,
                model_uri=model_uri,
                version=version,
                arch=str(info["arch"]),
                image_size=int(info["image_size"]),
                classes=[int(count) for count in info["classes"]],
                backend="local",
                deployed_at=now_iso(),
                previous_model_uri=current.model_uri if current else None,
                previous_version=current.version if current else None,
                model_ref=model_ref,
                previous_model_ref=current.model_ref if current else None,
                details={
                    **details,
                    "capture": capture.to_dict() if capture.enabled else None,
                    "capture_uri": capture_prefix(self.settings.artifact_root, name) if capture.enabled else None,
                },
            )
            self.records.write(record)
            return record

    def _capture_state(self, name: str, capture: CaptureConfig) -> dict[str, Any] | None:
        """What the router needs to capture (None: off)."""
        if not capture.enabled:
            return None
        return {
            "config": capture.to_dict(),
            "destination": capture_prefix(self.settings.artifact_root, name),
            "s3_endpoint_url": self.settings.s3_endpoint_url,
            "region": self.settings.aws_region,
        }

    def _start_host(self, name: str, model_dir: Path, version: str, workdir: Path) -> tuple[subprocess.Popen, str]:
        args = ["--model-dir", str(model_dir), "--name", name, *self.host_options.cli_args()]
        proc, port = self._spawn("bincount.local.host", args, 0, workdir, "host")
        return proc, f"http://{self.bind_host}:{port}"

    def _start_router(self, name: str, port: int, state: dict, workdir: Path, host_pid: int) -> dict[str, Any]:
        state_file = workdir / "router.json"
        _write_json(state_file, state)
        try:
            proc, port = self._spawn(
                "bincount.local.router", ["--name", name, "--state-file", str(state_file)], port, workdir, "router"
            )
        except OSError as error:
            self._stop(host_pid)
            raise DeployError(
                f"cannot bind the router of {name!r} to port {port} ({error}): free it or delete the endpoint"
            ) from None
        url = f"http://{self.bind_host}:{port}"
        deadline = time.monotonic() + 30
        while (status := self._router_status(url, name)) is None or status["target"] != state["target"]:
            if proc.poll() is not None or time.monotonic() > deadline:
                self._stop(proc.pid)
                self._stop(host_pid)
                raise DeployError(f"the router of {name!r} did not start: see {workdir / f'router-{proc.pid}.log'}")
            time.sleep(0.1)
        return {
            "router_pid": proc.pid,
            "router_port": port,
            "host_pid": host_pid,
            "host_url": state["target"],
            "workdir": str(workdir),
        }

    def _switch(self, current: EndpointRecord, host_pid: int, state: dict, workdir: Path) -> dict[str, Any]:
        """Point the running router at the new host, then retire the old host once it is idle."""
        router_pid = current.details["router_pid"]
        if not _is_ours(router_pid, "bincount.local.router"):  # a reused pid: SIGHUP would end a stranger
            self._stop(host_pid)
            raise DeployError(
                f"pid {router_pid}, recorded as the router of {current.name!r}, is not that router now: "
                f"the old model still serves; run `bincount delete-endpoint {current.name}` and deploy again"
            )
        state_file = workdir / "router.json"
        old_state = json.loads(state_file.read_text())
        _write_json(state_file, state)
        os.kill(router_pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (status := self._router_status(current.url, current.name)) is None or status["target"] != state["target"]:
            if time.monotonic() > deadline:
                _write_json(state_file, old_state)
                self._stop(host_pid)
                raise DeployError(
                    f"the router of {current.name!r} did not switch to the new model; the old one still serves"
                )
            time.sleep(0.05)
        old_url = current.details["host_url"]
        deadline = time.monotonic() + self.host_options.graceful_timeout_s
        while (status := self._router_status(current.url, current.name)) and status["inflight"].get(old_url, 0) > 0:
            if time.monotonic() > deadline:
                break  # the old host drains what is left on SIGTERM, within its own graceful timeout
            time.sleep(0.05)
        self._stop(current.details["host_pid"])
        return {**current.details, "host_pid": host_pid, "host_url": state["target"]}

    # processes -----------------------------------------------------------------------------
    def _spawn(self, module: str, args: list[str], port: int, workdir: Path, kind: str) -> tuple[subprocess.Popen, int]:
        """Start ``python -m module`` detached, serving on a socket bound here (so its port is known now)."""
        sock = listening_socket(self.bind_host, port)
        try:
            port = sock.getsockname()[1]
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
            }
            log_path = workdir / f"{kind}-pending.log"
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", module, *args, "--fd", str(sock.fileno()), "--host", self.bind_host],
                    pass_fds=[sock.fileno()],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # not killed with the flow run that started it
                    env=env,
                    cwd=PROJECT_ROOT,
                )
            log_path.rename(workdir / f"{kind}-{proc.pid}.log")
        finally:
            sock.close()
        self._children[proc.pid] = proc
        return proc, port

    def _wait_until_ready(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if proc.poll() is not None:
                raise ServingError(f"the model host exited with code {proc.returncode} while starting:\n{_tail(log)}")
            with contextlib.suppress(httpx.TransportError):  # still loading the model: try again
                if httpx.get(f"{url}/ping", timeout=2.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise ServingError(
                    f"the model host did not pass /ping within {self.start_timeout_s:.0f} s:\n{_tail(log)}"
                )
            time.sleep(0.2)

    def _post(self, url: str, body: bytes) -> bytes:
        try:
            answer = httpx.post(
                f"{url}/invocations", content=body, headers={"Content-Type": "image/jpeg"}, timeout=60.0
            )
        except httpx.TransportError as error:
            raise ServingError(f"the smoke invocation got no answer ({error})") from None
        if answer.status_code != 200:
            raise ServingError(f"the smoke invocation got {answer.status_code}: {answer.text[:300]}")
        return answer.content

    def _router_status(self, url: str, name: str) -> dict[str, Any] | None:
        try:
            answer = httpx.get(f"{url}/router/status", timeout=2.0)
        except httpx.TransportError:
            return None
        if answer.status_code != 200:
            return None
        status = answer.json()
        return status if status.get("name") == name else None

    def _stop(self, pid: int | None, timeout_s: float | None = None) -> None:
        """SIGTERM a process this backend started (it drains), SIGKILL it if it outstays ``timeout_s``."""
        if pid is None or not _is_ours(pid):
            return
        timeout_s = timeout_s if timeout_s is not None else self.host_options.graceful_timeout_s + 5
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self._running(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.05)
        self._children.pop(pid, None)

    def _running(self, pid: int) -> bool:
        if pid in self._children:
            return self._children[pid].poll() is None
        return _is_ours(pid)

    # invoke, delete ------------------------------------------------------------------------
    def invoke(self, name: str, body: bytes, content_type: str, accept: str = "application/json") -> bytes:
        record = self.describe(name)
        answer = runtime_client(record.url).invoke_endpoint(
            EndpointName=name, Body=body, ContentType=content_type, Accept=accept
        )
        return answer["Body"].read()

    def delete(self, name: str) -> None:
        record = self.describe(name)
        with file_lock(self.runtime_root / name / ".deploy.lock"):
            self._stop(record.details.get("router_pid"))
            self._stop(record.details.get("host_pid"))
            self.records.delete(name)

    # batch transform -----------------------------------------------------------------------
    def batch_transform(
        self,
        model_uri: str,
        input_uri: str,
        output_uri: str,
        *,
        batch_size: int = 16,
        labels_uri: str | None = None,
        progress: ProgressFn | None = None,
        rescore: bool = False,
    ) -> BatchTransformSummary:
        model_dir, version = fetch_model(self.storage, model_uri, self.runtime_root / "models")
        labels = load_labels(self.storage, labels_uri) if labels_uri else None
        return run_batch_transform(
            self.storage,
            model_dir,
            version,
            input_uri,
            output_uri,
            batch_size=batch_size,
            labels=labels,
            progress=progress,
            rescore=rescore,
        )


def _is_ours(pid: int, module: str = "bincount.local.") -> bool:
    """Whether ``pid`` is a live (not zombie) process running ``module``: guards against reused pids."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and module.encode() in cmdline


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data).encode())


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"
