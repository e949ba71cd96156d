"""The local serving backend: endpoints as processes on this machine, batch transform in-process.

Per endpoint::

    client ──► router (stable port: the endpoint URL) ──► model hosts (replicas, a port each)

The router runs the hosts (see ``bincount/local/router.py``): the backend writes its state file and
sends SIGHUP. A deploy adds the new model as a candidate variant with no traffic, waits until its
hosts answer ``/ping`` and one smoke invocation each, then moves traffic as the strategy says:
all at once (blue/green), a canary share baked for a while then all (or linear steps), with an
automatic rollback as soon as the new model's error rate or p99 latency is worse than the current
one's past the thresholds; or a shadow that gets a copy of requests until it is promoted or
stopped. A new model that fails any step is stopped and the old one keeps serving. The router is
detached, so an endpoint outlives the flow run that deployed it. Records (name, URL, model URI,
version, processes, the last rollout) live at ``{artifact_root}/endpoints/<name>.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
import uuid
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
from bincount.contracts.router import CaptureTarget, RouterState, RouterStatus, VariantSpec
from bincount.contracts.serving import (
    BatchTransformSummary,
    CaptureConfig,
    DeployError,
    EndpointNotFoundError,
    EndpointRecord,
    EndpointVariant,
    ProgressFn,
    Rollout,
    RolloutStep,
    RolloutStrategy,
    ScalingConfig,
    ServingError,
    ServingPath,
    ShadowReport,
    ShadowVariant,
    check_answer,
)
from bincount.endpoints import (
    EndpointRecords,
    judge_rollout,
    recorded_capture,
    recorded_scaling,
    shadow_verdict,
    smoke_image,
)
from bincount.local.batch import run_batch_transform
from bincount.local.host import HostOptions
from bincount.local.processes import is_ours, log_file, spawn, tail
from bincount.models import fetch_model
from bincount.registry import now_iso
from bincount.storage import Storage, atomic_write_bytes, file_lock, local_path, storage_for
from sm_scripts.model_dir import read_model_info

STATE_FILE = "router.json"  # in the endpoint's workdir


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
    """Endpoints as local processes (a router and its model hosts); batch transform in this process."""

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
        self,
        name: str,
        model_uri: str,
        model_ref: str | None = None,
        capture: CaptureConfig | None = None,
        strategy: RolloutStrategy | None = None,
        scaling: ScalingConfig | None = None,
    ) -> EndpointRecord:
        """Start ``name`` or move it to a new model as ``strategy`` says (None: all at once, blue/green).

        ``capture`` and ``scaling`` None keep the endpoint's settings (off and one replica for a new one).
        """
        check_endpoint_name(name)
        strategy = strategy or RolloutStrategy()
        workdir = self.runtime_root / name
        workdir.mkdir(parents=True, exist_ok=True)
        with file_lock(workdir / ".deploy.lock"):  # one deploy or delete of an endpoint at a time
            try:
                current = self.describe(name)
            except EndpointNotFoundError:
                current = None
            status = self._router_status(current.url, name) if current is not None else None
            shadow_running = status.candidate_variant if status is not None else None
            if shadow_running is not None:
                raise DeployError(
                    f"endpoint {name!r} has a shadow running ({shadow_running.version}): "
                    f"promote it or stop it first (`bincount endpoints promote-shadow {name}` or `stop-shadow`)"
                )
            model_dir, version = fetch_model(self.storage, model_uri, self.runtime_root / "models")
            info = read_model_info(model_dir)
            classes = [int(count) for count in info["classes"]]
            if strategy.kind == "shadow" and current is not None and status is not None and classes != current.classes:
                raise DeployError(
                    f"model {model_uri} counts {classes} and endpoint {name!r} counts {current.classes}: a shadow's "
                    "answers could not be compared; deploy it with another strategy"
                )
            scaling = scaling or recorded_scaling(current)
            refuse_rollout_at_zero(name, strategy, scaling, status)
            capture = capture or recorded_capture(current)
            variant_id = f"{version}-{uuid.uuid4().hex[:6]}"
            spec = VariantSpec(str(model_dir), version, model_uri, model_ref)
            smoke = smoke_image(int(info["image_size"]))
            if status is None:
                details = self._start(
                    name,
                    current,
                    variant_id,
                    spec,
                    scaling=scaling,
                    capture=capture,
                    workdir=workdir,
                    smoke=smoke,
                    classes=classes,
                )
                started = "no model was serving: the endpoint starts on this one"
                rollout = Rollout(strategy, "started", started, (_step("started", 100),))
            else:
                assert current is not None
                state = _read_state(workdir)
                state = dataclasses.replace(state, scaling=scaling, capture=self._capture_state(name, capture))
                state = self._add_candidate(
                    current, state, variant_id, spec, workdir=workdir, smoke=smoke, classes=classes
                )
                try:
                    rollout = self._roll_out(current, state, strategy)
                except BaseException:  # interrupted or failed mid-rollout: the current model takes all traffic again
                    with contextlib.suppress(Exception):
                        state = _read_state(workdir)  # as the rollout last wrote it
                        if state.candidate == variant_id:
                            self._drop_candidate(current, state)
                    raise
                details = {key: current.details[key] for key in ("router_pid", "router_port", "workdir")}
            if rollout.verdict == "rolled-back":
                record = current
                assert record is not None
            else:
                record = EndpointRecord(
                    name=name,
                    url=f"http://{self.bind_host}:{details['router_port']}",
                    model_uri=model_uri,
                    version=version,
                    arch=str(info["arch"]),
                    image_size=int(info["image_size"]),
                    classes=classes,
                    backend="local",
                    deployed_at=now_iso(),
                    previous_model_uri=current.model_uri if current else None,
                    previous_version=current.version if current else None,
                    model_ref=model_ref,
                    previous_model_ref=current.model_ref if current else None,
                    details=details,
                )
                if strategy.kind == "shadow" and status is not None:  # the current model still answers
                    assert current is not None
                    shadow = ShadowVariant(
                        variant_id, model_uri, version, model_ref, strategy.traffic_percent, now_iso()
                    )
                    record = dataclasses.replace(current, shadow=shadow)
            record = self._with_status(
                dataclasses.replace(
                    record,
                    capture=capture if capture.enabled else None,
                    capture_uri=capture_prefix(self.settings.artifact_root, name) if capture.enabled else None,
                    scaling=scaling,
                    rollout=rollout,
                )
            )
            self.records.write(record)
            return record

    def _capture_state(self, name: str, capture: CaptureConfig) -> CaptureTarget | None:
        """What the router needs to capture (None: off)."""
        if not capture.enabled:
            return None
        destination = capture_prefix(self.settings.artifact_root, name)
        return CaptureTarget(capture, destination, self.settings.s3_endpoint_url, self.settings.aws_region)

    def _start(
        self,
        name: str,
        current: EndpointRecord | None,
        variant_id: str,
        spec: VariantSpec,
        *,
        scaling: ScalingConfig,
        capture: CaptureConfig,
        workdir: Path,
        smoke: bytes,
        classes: list[int],
    ) -> dict[str, Any]:
        """Start the router (it starts the hosts) on a new endpoint, or on one recorded but down (at its port)."""
        if current is not None:  # recorded but down (e.g. after a reboot), or older: bring it back at its URL
            self._stop(current.details.get("router_pid"))
            self._stop(current.details.get("host_pid"))  # a host that a router from before variants did not own
        port = current.details["router_port"] if current is not None else 0
        state = RouterState(
            variants={variant_id: spec},
            current=variant_id,
            scaling=scaling,
            capture=self._capture_state(name, capture),
            bind_host=self.bind_host,
            workdir=str(workdir),
            host_args=tuple(self.host_options.cli_args()),
            replica_capacity=self.host_options.max_in_flight,
        )
        state_file = workdir / STATE_FILE
        _write_state(workdir, state)
        try:
            proc, port = spawn(
                "bincount.local.router",
                ["--name", name, "--state-file", str(state_file)],
                self.bind_host,
                port,
                workdir,
                "router",
                new_session=True,  # not killed with the flow run that started it
            )
        except OSError as error:
            raise DeployError(
                f"cannot bind the router of {name!r} to port {port} ({error}): free it or delete the endpoint"
            ) from None
        self._children[proc.pid] = proc
        url = f"http://{self.bind_host}:{port}"
        try:
            self._wait_for_variant(url, name, variant_id, proc, workdir)
            self._smoke(url, name, variant_id, smoke, classes)
        except ServingError as error:
            self._stop(proc.pid)
            raise DeployError(
                f"model {spec.model_uri} (version {spec.version}) did not pass its checks, "
                f"so endpoint {name!r} was not started: {error}"
            ) from None
        return {"router_pid": proc.pid, "router_port": port, "workdir": str(workdir)}

    def _add_candidate(
        self,
        current: EndpointRecord,
        state: RouterState,
        variant_id: str,
        spec: VariantSpec,
        *,
        workdir: Path,
        smoke: bytes,
        classes: list[int],
    ) -> RouterState:
        """Start the new model's hosts beside the current ones (no traffic yet) and smoke-check them; returns the
        state with it. On any failure they are stopped and the endpoint is as it was."""
        router_pid = current.details["router_pid"]
        if not is_ours(router_pid, "bincount.local.router"):  # a reused pid: SIGHUP would end a stranger
            raise DeployError(
                f"pid {router_pid}, recorded as the router of {current.name!r}, is not that router now: "
                f"the old model still serves; run `bincount delete-endpoint {current.name}` and deploy again"
            )
        variants = {**state.variants, variant_id: spec}
        added = dataclasses.replace(state, variants=variants, candidate=variant_id, mode="canary", percent=0)
        self._apply(current, added)
        try:
            self._wait_for_variant(current.url, current.name, variant_id, None, workdir)
            self._smoke(current.url, current.name, variant_id, smoke, classes)
        except ServingError as error:
            self._apply(current, state)
            raise DeployError(
                f"model {spec.model_uri} (version {spec.version}) did not pass its checks, "
                f"so endpoint {current.name!r} was left as it was: {error}"
            ) from None
        return added

    def _roll_out(self, current: EndpointRecord, state: RouterState, strategy: RolloutStrategy) -> Rollout:
        """Move traffic to the candidate as the strategy says; returns the rollout (verdict, reason, steps)."""
        candidate = state.candidate
        assert candidate is not None  # _add_candidate added it
        if strategy.kind == "shadow":
            self._apply(current, dataclasses.replace(state, mode="shadow", percent=strategy.traffic_percent))
            step = _step("shadow", strategy.traffic_percent)
            return Rollout(strategy, "shadowing", "the shadow gets a copy of requests", (step,))
        steps: list[RolloutStep] = []
        if strategy.kind == "canary":
            shares = [strategy.traffic_percent]
        elif strategy.kind == "linear":
            shares = list(range(strategy.traffic_percent, 100, strategy.traffic_percent))
        else:
            shares = []
        for percent in shares:
            state = dataclasses.replace(state, mode="canary", percent=percent)
            self._apply(current, state)
            bake = self._bake(current, state.current, candidate, strategy, percent)
            steps.append(bake)
            if bake.verdict == "fail":
                self._drop_candidate(current, state)
                steps.append(_step("rolled-back", 0, reason=bake.reason))
                return Rollout(strategy, "rolled-back", bake.reason or "", tuple(steps))
        self._promote(current, state)
        steps.append(_step("promoted", 100))
        reason = "every bake step passed" if shares else "the new model passed its smoke check"
        return Rollout(strategy, "completed", reason, tuple(steps))

    def _bake(
        self, current: EndpointRecord, current_id: str, candidate_id: str, strategy: RolloutStrategy, percent: int
    ) -> RolloutStep:
        """Watch one canary step at ``percent``: verdict "fail" as soon as :func:`judge_rollout` finds the candidate
        worse, "pass" once it baked ``bake_seconds`` and got the minimum sample the strategy's sensitivity asks for;
        "fail" if that sample does not arrive in time."""
        started = time.monotonic()
        give_up = started + max(3 * strategy.bake_seconds, strategy.bake_seconds + 30)
        while True:
            time.sleep(min(0.25, strategy.bake_seconds / 4))
            status = self._router_status(current.url, current.name)
            if status is None:
                return _step("bake", percent, verdict="fail", reason="the router stopped answering during the bake")
            new = status.variants[candidate_id]
            traffic = status.variants[current_id].traffic, new.traffic
            check = judge_rollout(*traffic, strategy, (100 - percent) / percent)
            seconds = time.monotonic() - started
            step = _step(
                "bake", percent, current=traffic[0], candidate=traffic[1], seconds=seconds, test=check.summary()
            )
            if check.verdict == "fail":
                return dataclasses.replace(step, verdict="fail", reason=check.reason)
            if new.failed:
                reason = f"the new model's hosts failed: {new.failed}"
                return dataclasses.replace(step, verdict="fail", reason=reason)
            if check.verdict == "pass" and seconds >= strategy.bake_seconds:
                return dataclasses.replace(step, verdict="pass", reason=f"{seconds:.0f} s: {check.reason}")
            if time.monotonic() > give_up:
                reason = f"in {seconds:.0f} s {check.reason}: too little traffic to judge it"
                return dataclasses.replace(step, verdict="fail", reason=reason)

    def _promote(self, current: EndpointRecord, state: RouterState) -> None:
        """Make the candidate the current model; the old one's hosts finish what they have, then stop."""
        old, candidate = state.current, state.candidate
        assert candidate is not None
        variants = {key: spec for key, spec in state.variants.items() if key != old}
        self._apply(
            current, dataclasses.replace(state, variants=variants, current=candidate, candidate=None, percent=0)
        )
        self._wait_retired(current, old)

    def _drop_candidate(self, current: EndpointRecord, state: RouterState) -> None:
        """Send no more traffic to the candidate; its hosts finish what they have, then stop."""
        candidate = state.candidate
        assert candidate is not None
        variants = {key: spec for key, spec in state.variants.items() if key != candidate}
        self._apply(current, dataclasses.replace(state, variants=variants, candidate=None, percent=0))
        self._wait_retired(current, candidate)

    def _wait_retired(self, current: EndpointRecord, variant_id: str) -> None:
        deadline = time.monotonic() + self.host_options.graceful_timeout_s + 10
        while (status := self._router_status(current.url, current.name)) and variant_id in status.variants:
            if time.monotonic() > deadline:
                return  # its hosts drain on their own SIGTERM, within their graceful timeout
            time.sleep(0.05)

    def _apply(self, current: EndpointRecord, state: RouterState) -> None:
        """Write the router's state file and make it re-read it (SIGHUP); returns once it routes as written."""
        _write_state(Path(current.details["workdir"]), state)
        os.kill(current.details["router_pid"], signal.SIGHUP)
        deadline = time.monotonic() + 10
        routing = (state.current, state.candidate, state.percent)
        while (status := self._router_status(current.url, current.name)) is None or (
            status.current,
            status.candidate,
            status.percent,
        ) != routing:
            if time.monotonic() > deadline:
                raise DeployError(f"the router of {current.name!r} did not take its new state within 10 s")
            time.sleep(0.05)

    def _wait_for_variant(
        self, url: str, name: str, variant_id: str, proc: subprocess.Popen | None, workdir: Path
    ) -> None:
        """Until every replica of the variant answers /ping; ServingError if one cannot start."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            status = self._router_status(url, name)
            variant = status.variants.get(variant_id) if status is not None else None
            if variant is not None and variant.failed:
                raise ServingError(variant.failed)
            if variant is not None and variant.replicas and variant.ready == len(variant.replicas):
                return
            if proc is not None and proc.poll() is not None:
                raise ServingError(
                    f"the router exited with code {proc.returncode}:\n{tail(log_file(workdir, 'router', proc.pid))}"
                )
            if time.monotonic() > deadline:
                raise ServingError(f"the model hosts did not pass /ping within {self.start_timeout_s:.0f} s")
            time.sleep(0.1)

    def _smoke(self, url: str, name: str, variant_id: str, smoke: bytes, classes: list[int]) -> None:
        """One invocation on each replica of the variant, straight to the host."""
        status = self._router_status(url, name)
        for replica in status.variants[variant_id].replicas if status is not None else ():
            check_answer(self._post(replica.url, smoke), classes)

    def _with_status(self, record: EndpointRecord) -> EndpointRecord:
        """The record with what the router now runs: variants, weights, replicas."""
        status = self._router_status(record.url, record.name)
        serving = status.current_variant if status is not None else None
        host = serving.replicas[0] if serving is not None and serving.replicas else None
        shadow = status.candidate if status is not None and status.mode == "shadow" else None
        return dataclasses.replace(
            record,
            details={
                **record.details,
                "host_url": host.url if host is not None else None,
                "host_pid": host.pid if host is not None else None,
            },
            serving=self._serving(record, host.url) if host is not None else None,
            replicas=len(serving.replicas) if serving is not None else 0,
            variants=tuple(
                EndpointVariant(
                    id=variant_id,
                    version=variant.version,
                    model_ref=variant.model_ref,
                    weight=status.weight(variant_id),
                    shadow_percent=status.percent if variant_id == shadow else None,
                    replicas=len(variant.replicas),
                )
                for variant_id, variant in (status.variants.items() if status is not None else ())
            ),
        )

    def _serving(self, record: EndpointRecord, host_url: str) -> ServingPath | None:
        """Which forward the serving model's hosts run (their /ping) and why: the optimized form where it passed
        parity and loads, else eager (the endpoint artifact shows it)."""
        try:
            path = httpx.get(f"{host_url}/ping", timeout=10).json()["serving"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        model_dir, _ = fetch_model(self.storage, record.model_uri, self.runtime_root / "models")
        optimized = read_model_info(model_dir).get("optimized")
        if optimized is None:
            reason = "the model has no optimized form (the optimize stage's model-optimization artifact says why)"
        elif path == "eager":
            reason = "its optimized form did not load on the host: the host's log says why"
        else:
            reason = f"it passed parity (top-1 agreement {optimized.get('parity', {}).get('top1_agreement')})"
        return ServingPath(path, reason)

    # shadow --------------------------------------------------------------------------------
    def shadow_report(self, name: str) -> ShadowReport:
        """Agreement, latency and errors of the shadow against the current model, and whether to promote it."""
        record = self.describe(name)
        status = self._router_status(record.url, name)
        current = status.current_variant if status is not None else None
        shadow = status.candidate_variant if status is not None and status.mode == "shadow" else None
        if current is None or shadow is None or record.rollout is None:
            raise ServingError(f"endpoint {name!r} has no shadow running")
        return shadow_verdict(
            current.traffic,
            shadow.traffic,
            record.rollout.strategy,
            compared=shadow.compared,
            agreed=shadow.agreed,
            skipped=shadow.skipped,
            since=record.shadow.started_at if record.shadow else None,
        )

    def promote_shadow(self, name: str) -> EndpointRecord:
        return self._end_shadow(name, promote=True)

    def stop_shadow(self, name: str) -> EndpointRecord:
        return self._end_shadow(name, promote=False)

    def _end_shadow(self, name: str, promote: bool) -> EndpointRecord:
        with file_lock(self.runtime_root / name / ".deploy.lock"):
            report = self.shadow_report(name)
            current = self.describe(name)
            state = _read_state(Path(current.details["workdir"]))
            assert state.candidate is not None  # shadow_report checked
            shadow = state.variants[state.candidate]
            rollout = current.rollout
            assert rollout is not None  # shadow_report checked
            if promote:
                self._promote(current, state)
                info = read_model_info(Path(shadow.model_dir))
                record = dataclasses.replace(
                    current,
                    model_uri=shadow.model_uri,
                    version=shadow.version,
                    arch=str(info["arch"]),
                    image_size=int(info["image_size"]),
                    classes=[int(count) for count in info["classes"]],
                    deployed_at=now_iso(),
                    previous_model_uri=current.model_uri,
                    previous_version=current.version,
                    model_ref=shadow.model_ref,
                    previous_model_ref=current.model_ref,
                )
            else:
                self._drop_candidate(current, state)
                record = current
            verdict = "promoted" if promote else "stopped"
            step = _step(
                verdict,
                100 if promote else 0,
                reason=report.reason,
                current=report.current,
                candidate=report.shadow,
                test=report.test,
            )
            rollout = dataclasses.replace(
                rollout,
                verdict=verdict,
                reason=f"shadow {verdict} by request ({report.reason})",
                report=report,
                steps=(*rollout.steps, step),
            )
            record = self._with_status(dataclasses.replace(record, shadow=None, rollout=rollout))
            self.records.write(record)
            return record

    # processes -----------------------------------------------------------------------------
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

    def _router_status(self, url: str, name: str) -> RouterStatus | None:
        """What the router of ``name`` at ``url`` runs; None when none answers there (or a router from before
        variants does, which a deploy restarts)."""
        try:
            answer = httpx.get(f"{url}/router/status", timeout=2.0)
        except httpx.TransportError:
            return None
        if answer.status_code != 200:
            return None
        status = answer.json()
        return RouterStatus.from_dict(status) if status.get("name") == name and "variants" in status else None

    def _stop(self, pid: int | None, timeout_s: float | None = None) -> None:
        """SIGTERM a process this backend started (it drains), SIGKILL it if it outstays ``timeout_s``."""
        if pid is None or not is_ours(pid):
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
        return is_ours(pid)

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
            self._stop(record.details.get("router_pid"))  # it stops its hosts once they drain
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


def refuse_rollout_at_zero(
    name: str, strategy: RolloutStrategy, scaling: ScalingConfig, status: RouterStatus | None
) -> None:
    """A canary, linear or shadow rollout compares the new model with the running one (``status``: its router's;
    None when none serves) on live traffic: refused (DeployError) where it scales to zero, or is scaled to zero."""
    if status is None or strategy.kind == "all-at-once":
        return
    if scaling.scales_to_zero:
        raise DeployError(
            f"a {strategy.kind} rollout on endpoint {name!r} needs its models running, and min_replicas 0 stops them "
            "when idle: deploy all at once, or give this deploy min_replicas 1 and set 0 again after"
        )
    if status.scaled_to_zero:
        raise DeployError(
            f"endpoint {name!r} is scaled to zero, and a {strategy.kind} rollout compares the new model with the "
            "running one: send it a request first (that starts its host), or deploy all at once"
        )


def _read_state(workdir: Path) -> RouterState:
    path = workdir / STATE_FILE
    return RouterState.from_dict(json.loads(path.read_text()), f"router state file {path}")


def _write_state(workdir: Path, state: RouterState) -> None:
    atomic_write_bytes(workdir / STATE_FILE, json.dumps(state.to_dict()).encode())


def _step(action: str, percent: int, **fields: Any) -> RolloutStep:
    """One entry of a rollout, stamped now."""
    return RolloutStep(now_iso(), action, percent, **fields)
