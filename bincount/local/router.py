"""The endpoint's front door: a stable address in front of the endpoint's model hosts, which it runs itself.

    python -m bincount.local.router --name NAME --state-file FILE [--port P | --fd N]

A local endpoint is this router plus its model host processes (replicas). The state file (a
:class:`~bincount.contracts.router.RouterState`, re-read on SIGHUP) names the variants (a model each:
``variants``), the one that answers (``current``) and at most one ``candidate`` that takes ``percent`` of
requests (``mode`` ``canary``) or gets a copy of them in the background (``mode`` ``shadow``: users' answers stay the
current model's; agreement of the counts, latency and errors of both are counted). A variant that
leaves the state file stops taking requests, finishes those in flight, and its hosts stop.

Replicas: each variant runs replica hosts (the current one's count at the time, else
``scaling.min_replicas``); a request goes to the replica with the fewest requests in flight. A
replica that exits is restarted (only its requests in flight fail, with 502; while a canary has no
replica ready, its share goes to the current model). With ``scaling.max_replicas`` above the minimum,
the current variant gains a replica when the in-flight requests per replica stay above
``scaling.target_in_flight`` for ``scale_out_cooldown_s``, and loses one when its load would fit in
one fewer for ``scale_in_cooldown_s``. With ``scaling.min_replicas`` 0 the current variant's hosts stop once
the endpoint has had no request for ``scale_in_idle_seconds`` (never beside a candidate); the next request
starts one and waits for it (a cold start), at most ``cold_start_timeout_s``, else it gets a 503 with
Retry-After. Scaled to zero, ``/ping`` is answered by the router itself (``"scaled_to_zero": true``), so
health checks stay green and do not wake the endpoint.

``GET /router/status`` (a :class:`~bincount.contracts.router.RouterStatus`) reports per variant its replicas
(URL, pid, in flight, ready), restarts and, since the routing last changed, requests, 5xx/connection errors
and p99 latency (the backend's canary judges on these), plus the shadow's agreement. ``GET /ping`` answers
with the registered model version it serves (``model_version``) and its weights.

Data capture (the state file's ``capture``: a :class:`~bincount.contracts.router.CaptureTarget`) happens here:
a sampled invocation's body, answer, status (and inside a runtime ``ModelError`` the model's own) and latency
go to a :class:`~bincount.capture.CaptureWriter` queue after the answer is ready; SIGTERM drains the queue
into the files, after the hosts have answered every request in flight and stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bincount.capture import CaptureWriter, Exchange
from bincount.contracts.router import (
    CaptureStatus,
    CaptureTarget,
    ReplicaStatus,
    RouterMode,
    RouterState,
    RouterStatus,
    ScalingEvent,
    VariantSpec,
    VariantStatus,
)
from bincount.contracts.serving import ScalingConfig, TrafficStats
from bincount.local import httpio
from bincount.local.processes import log_file, spawn, tail
from bincount.storage import Storage

logger = logging.getLogger("bincount.local.router")

_FORWARDED_HEADERS = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes")
_RETURNED_HEADERS = ("content-type", "x-amzn-errortype", "x-amzn-invoked-production-variant")
LATENCY_WINDOW = 2000  # latencies kept per variant for its p99
SUPERVISE_S = 0.2  # how often replicas are checked and load is sampled
MAX_SHADOW_IN_FLIGHT = 64  # copies past this are skipped (and counted), so a slow shadow cannot pile up
MAX_FAILED_STARTS = 3  # a replica that exits before it is ready this often in a row is not started again
ROOM_CHECK_S = 0.5  # a request waiting for room looks again this often, in case no answer woke it (a replica died)
COLD_START_CHECK_S = 0.05  # a request waiting for a cold start looks this often whether a host is ready
RETRY_AFTER_S = 5  # what a request that a cold start could not serve in time is told


@dataclasses.dataclass
class Replica:
    proc: subprocess.Popen
    url: str
    client: httpx.AsyncClient
    inflight: int = 0
    ready: bool = False
    retiring: bool = False  # takes no new requests; stopped once it has none in flight
    stopping: bool = False  # SIGTERM sent (once: a second one would cut its drain short)

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(self.url, self.proc.pid, self.inflight, self.ready)


@dataclasses.dataclass
class Stats:
    """One variant's traffic since the routing last changed."""

    requests: int = 0
    errors: int = 0  # 5xx answers (a model's own inside a runtime ModelError too) and hosts that did not answer
    latencies: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW))
    compared: int = 0  # shadow copies whose count was compared with the current model's
    agreed: int = 0
    skipped: int = 0  # shadow copies not sent (too many in flight)

    def add(self, status: int, seconds: float) -> None:
        self.requests += 1
        self.errors += status >= 500
        self.latencies.append(1000 * seconds)

    def traffic(self) -> TrafficStats:
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None
        return TrafficStats(self.requests, self.errors, p99)


class Variant:
    """One model and its replica hosts."""

    def __init__(self, variant_id: str, spec: VariantSpec) -> None:
        self.id, self.spec = variant_id, spec
        self.replicas: list[Replica] = []
        self.stats = Stats()
        self.restarts = 0
        self.failed_starts = 0
        self.ever_ready = False
        self.cold = False  # scaled to zero: its hosts stopped for want of requests, until one is ready again
        self.failed: str | None = None  # why its hosts cannot start (the host's log)
        self.retiring = False
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()  # requests held for room, FIFO

    async def wait_for_room(self, first: bool) -> None:
        """Until a replica of this variant answers a request (or a short while passes); ``first``: at the head
        of the line (a request that was woken and lost its slot to a newcomer)."""
        room = asyncio.get_running_loop().create_future()
        (self.waiting.appendleft if first else self.waiting.append)(room)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(room, ROOM_CHECK_S)
        finally:
            with contextlib.suppress(ValueError):
                self.waiting.remove(room)

    def wake_one(self) -> None:
        while self.waiting:
            room = self.waiting.popleft()
            if not room.done():
                room.set_result(None)
                return

    def active(self) -> list[Replica]:
        return [replica for replica in self.replicas if not replica.retiring]

    def pick(self) -> Replica | None:
        """The ready replica with the fewest requests in flight."""
        ready = [replica for replica in self.replicas if replica.ready and not replica.retiring]
        return min(ready, key=lambda replica: replica.inflight) if ready else None

    def status(self) -> VariantStatus:
        stats = self.stats
        return VariantStatus(
            version=self.spec.version,
            model_ref=self.spec.model_ref,
            model_uri=self.spec.model_uri,
            replicas=tuple(replica.status() for replica in self.active()),
            ready=sum(replica.ready for replica in self.active()),
            waiting=len(self.waiting),
            restarts=self.restarts,
            failed=self.failed,
            traffic=stats.traffic(),
            compared=stats.compared,
            agreed=stats.agreed,
            skipped=stats.skipped,
        )


class Router:
    """Routing state: the variants, their replicas and the split between them (one event loop: no locks)."""

    def __init__(self, name: str, state_file: Path) -> None:
        self.name = name
        self.state_file = state_file
        self.variants: dict[str, Variant] = {}
        self.current: str | None = None
        self.candidate: str | None = None
        self.mode: RouterMode = "canary"
        self.percent = 0
        self.scaling = ScalingConfig()
        self.scaling_events: tuple[ScalingEvent, ...] = ()
        self._load: float = 0.0  # in flight per replica of the current variant, smoothed
        self._above_since: float | None = None
        self._below_since: float | None = None
        self._state: RouterState | None = None
        self._shadow_tasks: set[asyncio.Task] = set()
        self.capture: CaptureWriter | None = None
        self._capture: CaptureTarget | None = None
        self.replica_capacity = 0  # set by reload, before any request
        self._busy_at = time.monotonic()  # a request began or ended, a host became ready, or the routing changed

    # state ---------------------------------------------------------------------------------
    def reload(self) -> None:
        """Apply the state file: start new variants' hosts, retire those that left, set the split."""
        state = RouterState.from_dict(json.loads(self.state_file.read_text()), f"state file {self.state_file}")
        self._state = state
        self.replica_capacity = state.replica_capacity
        self.scaling = state.scaling
        routing = state.routing
        if routing != (self.current, self.candidate, self.mode, self.percent):
            logger.info("endpoint %s: current %s, candidate %s (%s %s%%)", self.name, *routing)
            for variant in self.variants.values():
                variant.stats = Stats()
            self._busy_at = time.monotonic()
        for variant_id, spec in state.variants.items():
            if variant_id not in self.variants:
                variant = self.variants[variant_id] = Variant(variant_id, spec)
                running = self.variants.get(self.current) if self.current else None
                count = len(running.active()) if running is not None else self.scaling.min_replicas
                for _ in range(max(1, count)):
                    self._start_replica(variant)
        for variant in self.variants.values():
            if variant.id not in state.variants and not variant.retiring:
                logger.info("endpoint %s: retiring %s (%s)", self.name, variant.id, variant.spec.version)
                variant.retiring = True
                for replica in variant.replicas:
                    replica.retiring = True
        self.current, self.candidate, self.mode, self.percent = routing
        self._configure_capture(state.capture)

    def _configure_capture(self, capture: CaptureTarget | None) -> None:
        """Start, change or stop the capture writer as the state file says (a changed one drains in the background)."""
        if capture == self._capture:
            return
        old, self.capture, self._capture = self.capture, None, capture
        if capture is not None:
            storage = Storage(s3_endpoint_url=capture.s3_endpoint_url, region=capture.region)
            self.capture = CaptureWriter(capture.destination, capture.config, storage)
            logger.info("capturing %d%% of requests to %s", capture.config.sampling_percentage, capture.destination)
        if old is not None:
            asyncio.get_running_loop().run_in_executor(None, old.close)

    # replicas ------------------------------------------------------------------------------
    def _start_replica(self, variant: Variant) -> None:
        state = self._state
        assert state is not None  # replicas start on a reload
        args = ["--model-dir", variant.spec.model_dir, "--name", self.name, "--parent-pid", str(os.getpid())]
        args += state.host_args
        bind_host = state.bind_host
        proc, port = spawn("bincount.local.host", args, bind_host, 0, self._workdir(), "host", new_session=False)
        url = f"http://{bind_host}:{port}"
        # idle connections expire (5 s) long before the host drops them (75 s): no reuse race
        client = httpx.AsyncClient(
            base_url=url,
            timeout=httpx.Timeout(120.0, connect=5.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=5.0),
        )
        variant.replicas.append(Replica(proc, url, client))
        logger.info("endpoint %s: started replica %s (pid %d) of %s", self.name, url, proc.pid, variant.id)

    def _workdir(self) -> Path:
        workdir = self._state.workdir if self._state is not None else None
        return Path(workdir) if workdir else self.state_file.parent

    async def supervise(self) -> None:
        """Forever: mark replicas ready, restart those that died, stop drained ones, scale the current variant."""
        while True:
            await asyncio.sleep(SUPERVISE_S)
            try:
                await self._supervise_once()
            except Exception:  # the loop must outlive any one fault, or nothing restarts again
                logger.exception("supervising the replicas failed")

    async def _supervise_once(self) -> None:
        for variant in list(self.variants.values()):
            for replica in list(variant.replicas):
                await self._supervise_replica(variant, replica)
            if variant.retiring and not variant.replicas:
                del self.variants[variant.id]
        self._autoscale()
        self._scale_to_zero()

    async def _supervise_replica(self, variant: Variant, replica: Replica) -> None:
        if replica.proc.poll() is None:
            if replica.retiring and replica.inflight == 0 and not replica.stopping:
                replica.stopping = True
                replica.proc.terminate()  # it drains (nothing is in flight) and exits
            elif not replica.ready:
                with contextlib.suppress(httpx.TransportError):
                    replica.ready = (await replica.client.get("/ping", timeout=1.0)).status_code == 200
                    if replica.ready:
                        variant.failed_starts, variant.ever_ready, variant.cold = 0, True, False
                        self._busy_at = time.monotonic()
            return
        variant.replicas.remove(replica)
        await replica.client.aclose()
        code = replica.proc.returncode
        if replica.retiring:
            return
        if not replica.ready:
            variant.failed_starts += 1
            if variant.failed_starts >= MAX_FAILED_STARTS or not variant.ever_ready or variant.cold:
                log = tail(log_file(self._workdir(), "host", replica.proc.pid))
                variant.failed = f"the model host exited with code {code} while starting:\n{log}"
                logger.error("endpoint %s: %s: %s", self.name, variant.id, variant.failed)
                return
        pid = replica.proc.pid
        logger.error("endpoint %s: replica %s (pid %d) exited (%s): restarting", self.name, replica.url, pid, code)
        variant.restarts += 1
        self._start_replica(variant)

    def _autoscale(self) -> None:
        variant = self.variants.get(self.current) if self.current else None
        scaling = self.scaling
        if variant is None or not scaling.autoscaling:
            return
        active = variant.active()
        load = (sum(replica.inflight for replica in active) + len(variant.waiting)) / max(1, len(active))
        self._load = 0.7 * self._load + 0.3 * load
        now = time.monotonic()
        above = self._load > scaling.target_in_flight and len(active) < scaling.max_replicas
        fits_in_fewer = len(active) > 1 and self._load * len(active) / (len(active) - 1) < scaling.target_in_flight / 2
        below = fits_in_fewer and len(active) > scaling.min_replicas
        self._above_since = (self._above_since or now) if above else None
        self._below_since = (self._below_since or now) if below else None
        if self._above_since is not None and now - self._above_since >= scaling.scale_out_cooldown_s:
            self._start_replica(variant)
            self._scaled(variant, "out", load)
        elif self._below_since is not None and now - self._below_since >= scaling.scale_in_cooldown_s:
            min(active, key=lambda replica: replica.inflight).retiring = True
            self._scaled(variant, "in", load)

    def _scale_to_zero(self) -> None:
        """With ``min_replicas`` 0, stop the current variant's hosts once the endpoint has been idle for
        ``scale_in_idle_seconds``; scaled to zero with a minimum above 0 now (the state file changed), start one."""
        variant = self.variants.get(self.current) if self.current else None
        if variant is None or variant.failed is not None:
            return
        active = variant.active()
        if not self.scaling.scales_to_zero:
            if not active and variant.cold:
                logger.info("endpoint %s: min_replicas is above 0 now: starting a host", self.name)
                self._start_replica(variant)
                self._scaled(variant, "out", 0.0)
            return
        idle = time.monotonic() - self._busy_at >= self.scaling.scale_in_idle_seconds
        busy = variant.waiting or any(replica.inflight or not replica.ready for replica in active)
        if active and idle and not busy and self.candidate is None:  # a candidate is compared with running hosts
            for replica in active:
                replica.retiring = True  # stopped by the supervisor, as nothing is in flight
            variant.cold = True
            self._scaled(variant, "in", 0.0)

    def scaled_to_zero(self) -> bool:
        """Whether the current model's hosts were stopped for want of requests (a request may be starting one)."""
        variant = self.variants.get(self.current) if self.current else None
        return variant is not None and variant.cold

    async def _cold_start(self, variant: Variant, path: str) -> Response | None:
        """Start a host for a variant scaled to zero (unless one is starting) and wait until one is ready: None
        then, else the 503 (with Retry-After) to answer: the host failed to start (not retried: the next request
        tries again), or was not ready in time."""
        if not variant.active():
            logger.info("endpoint %s: a request while scaled to zero: starting a host of %s", self.name, variant.id)
            variant.failed, variant.failed_starts = None, 0  # a new try: the last one's failure may have passed
            self._start_replica(variant)
            self._scaled(variant, "out", 0.0)
        deadline = time.monotonic() + self.scaling.cold_start_timeout_s
        while variant.pick() is None:
            if variant.failed is not None:
                reason = f"its model host could not start: {variant.failed}"
                break
            if time.monotonic() > deadline:
                reason = f"its model host was not ready within {self.scaling.cold_start_timeout_s:g} s"
                break
            await asyncio.sleep(COLD_START_CHECK_S)
        else:
            return None
        answer = _error(
            path, 503, f"endpoint {self.name} was scaled to zero and {reason}; try again in {RETRY_AFTER_S} s"
        )
        answer.headers["retry-after"] = str(RETRY_AFTER_S)
        return answer

    def _scaled(self, variant: Variant, direction: Literal["in", "out"], load: float) -> None:
        self._above_since = self._below_since = None
        replicas = len(variant.active())
        event = ScalingEvent(_now(), direction, replicas, round(load, 2))
        self.scaling_events = (*self.scaling_events[-19:], event)
        logger.info("endpoint %s: scaled %s to %d replicas", self.name, direction, replicas)

    # requests ------------------------------------------------------------------------------
    def choose(self) -> Variant | None:
        """The variant that answers this request: the candidate for its share of a canary, else the current one."""
        candidate = self.variants.get(self.candidate) if self.candidate else None
        if (
            candidate is not None
            and self.mode == "canary"
            and random.random() * 100 < self.percent
            and candidate.pick() is not None
        ):
            return candidate
        return self.variants.get(self.current) if self.current else None

    async def forward(
        self,
        variant: Variant | None,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        fallback: Variant | None = None,
    ) -> tuple[Response, Variant | None]:
        """Send the request to the variant's least busy replica and return the answer and the variant that gave
        it. When every replica has ``replica_capacity`` in flight the request waits in the variant's line (first
        come, first served: one queue for all replicas, so no request waits behind one replica's slow moment
        while another is free). A replica that refuses the connection (it died: nothing was sent) is taken out
        of rotation until it answers /ping again, and the next replica gets the request; when the variant has
        none ready, ``fallback`` (a canary's current model) gets it, since it was never sent."""
        start = time.perf_counter()
        woken = False
        while True:
            replica = variant.pick() if variant is not None else None
            if replica is None and variant is not None and fallback is not None and fallback is not variant:
                logger.warning("%s has no replica ready: %s answers this request", variant.id, fallback.id)
                variant, fallback, woken = fallback, None, False
                continue
            if replica is None and variant is not None and variant.id == self.current and self.scaled_to_zero():
                refused = await self._cold_start(variant, path)
                if refused is not None:
                    return refused, variant
                continue
            if variant is None or replica is None:
                return _error(path, 503, f"endpoint {self.name} has no model host ready; try again shortly"), variant
            if replica.inflight >= self.replica_capacity or (variant.waiting and not woken):
                await variant.wait_for_room(first=woken)
                woken = True
                continue
            replica.inflight += 1  # counted before any await: a switch cannot slip in between
            try:
                answer = await replica.client.request(method, path, headers=headers, content=body)
                break
            except httpx.ConnectError as error:
                logger.error(
                    "replica %s of %s refused a connection (%s): trying another", replica.url, variant.id, error
                )
                replica.ready = False
            except httpx.TransportError as error:
                logger.error("replica %s of %s did not answer %s: %s", replica.url, variant.id, path, error)
                replica.ready = False
                variant.stats.add(502, time.perf_counter() - start)
                return _error(path, 502, f"the model host of endpoint {self.name} did not answer ({error})"), variant
            finally:
                replica.inflight -= 1
                variant.wake_one()
        if method == "POST":
            variant.stats.add(_model_status(answer), time.perf_counter() - start)
        returned = {key: answer.headers[key] for key in _RETURNED_HEADERS if key in answer.headers}
        return Response(answer.content, status_code=answer.status_code, headers=returned), variant

    async def invoke(self, path: str, headers: dict[str, str], body: bytes) -> tuple[Response, Variant | None]:
        """One invocation: answered by the chosen variant (the current one when a canary has no host ready); a
        shadow gets its copy once the answer is ready."""
        current = self.variants.get(self.current) if self.current else None
        self._busy_at = time.monotonic()
        answer, variant = await self.forward(self.choose(), "POST", path, headers, body, fallback=current)
        self._busy_at = time.monotonic()
        shadow = self.variants.get(self.candidate) if self.candidate and self.mode == "shadow" else None
        if shadow is not None and random.random() * 100 < self.percent:
            if sum(replica.inflight for replica in shadow.replicas) + len(shadow.waiting) >= MAX_SHADOW_IN_FLIGHT:
                shadow.stats.skipped += 1
            else:
                task = asyncio.create_task(self._shadow(shadow, path, headers, body, answer))
                self._shadow_tasks.add(task)
                task.add_done_callback(self._shadow_tasks.discard)
        return answer, variant

    async def _shadow(self, shadow: Variant, path: str, headers: dict[str, str], body: bytes, answer: Response) -> None:
        copy, _ = await self.forward(shadow, "POST", path, {**headers, "accept": "application/json"}, body)
        mine = _counts(answer)
        theirs = _counts(copy)
        if mine is not None and theirs is not None:
            shadow.stats.compared += 1
            shadow.stats.agreed += mine == theirs

    def record(
        self, body: bytes, headers: dict[str, str], answer: Response, variant: Variant | None, start: float
    ) -> None:
        """Offer one answered invocation to the capture writer (a dict copy and a queue put: nothing waits)."""
        writer = self.capture
        if writer is None or not writer.sampled():
            return
        writer.offer(
            Exchange(
                body=body,
                content_type=headers.get("content-type", ""),
                answer=bytes(answer.body),
                answer_type=answer.headers.get("content-type", ""),
                status=answer.status_code,
                latency_ms=1000 * (time.perf_counter() - start),
                at=dt.datetime.now(dt.UTC),
                inference_id=headers.get("x-amzn-sagemaker-inference-id"),
                model_version=(variant.spec.model_ref or variant.spec.version) if variant is not None else None,
                original_status=_original_status(
                    answer.status_code, answer.headers.get("x-amzn-errortype"), bytes(answer.body)
                ),
            )
        )

    async def ping(self) -> Response:
        """The host's answer, with what the endpoint serves (SageMaker's contract: 200 and a small body); scaled
        to zero, the router's own (a health check must not wake the endpoint)."""
        current = self.variants.get(self.current) if self.current else None
        if current is None:
            return (await self.forward(None, "GET", "/ping", {}, None))[0]
        served = {"model_version": current.spec.model_ref, "weights": current.spec.version}
        if self.scaled_to_zero():
            return JSONResponse({"status": "Healthy", "scaled_to_zero": True, **served})
        answer, _ = await self.forward(current, "GET", "/ping", {}, None)
        if answer.status_code != 200:
            return answer
        return JSONResponse({**json.loads(answer.body), **served})

    def status(self) -> RouterStatus:
        current = self.variants.get(self.current) if self.current else None
        first = current.pick() if current is not None else None
        return RouterStatus(
            name=self.name,
            current=self.current,
            candidate=self.candidate,
            mode=self.mode,
            percent=self.percent,
            target=first.url if first is not None else None,
            version=current.spec.version if current is not None else None,
            variants={variant_id: variant.status() for variant_id, variant in self.variants.items()},
            scaling=self.scaling,
            scaled_to_zero=self.scaled_to_zero(),
            scaling_events=self.scaling_events,
            capture=CaptureStatus(**self.capture.stats.to_dict()) if self.capture else None,
        )

    async def close(self) -> None:
        """Stop every host (each drains what it has), then the capture writer."""
        for variant in self.variants.values():
            for replica in variant.replicas:
                if replica.proc.poll() is None and not replica.stopping:
                    replica.proc.terminate()
        for variant in self.variants.values():
            for replica in variant.replicas:
                await asyncio.get_running_loop().run_in_executor(None, _wait_or_kill, replica.proc)
                await replica.client.aclose()
        if self.capture is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.capture.close)


def _original_status(status: int, error_type: str | None, body: bytes) -> int | None:
    """Inside the runtime route's ``ModelError`` (424): the model container's own status; None for other answers."""
    if status == 424 and error_type == "ModelError":
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(body)["OriginalStatusCode"])
    return None


def _model_status(answer: httpx.Response) -> int:
    """The status a variant is judged by: on the runtime route a model's own failure comes wrapped in a
    ``ModelError`` (424) that carries the container's status; its 500 is the model's error, not the caller's."""
    original = _original_status(answer.status_code, answer.headers.get("x-amzn-errortype"), answer.content)
    return answer.status_code if original is None else original


def _error(path: str, status: int, message: str) -> Response:
    """An error of the endpoint itself, shaped as the route's clients expect (runtime or container)."""
    if path.startswith("/endpoints/"):
        return httpio.runtime_error("ServiceUnavailable" if status == 503 else "InternalFailure", status, message)
    return httpio.container_error(status, message)


def _wait_or_kill(proc: subprocess.Popen, timeout_s: float = 40.0) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _counts(answer: Response) -> list[int] | None:
    """The counts in an answer (JSON or CSV), None for an error or an answer that is not a prediction."""
    if answer.status_code != 200:
        return None
    try:
        if answer.headers.get("content-type", "").startswith("text/csv"):
            return [int(line.split(",")[0]) for line in bytes(answer.body).decode().splitlines() if line]
        return [int(item["predicted_count"]) for item in json.loads(answer.body)["predictions"]]
    except (ValueError, KeyError, TypeError):
        return None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def forwarded_headers(request: Request) -> dict[str, str]:
    return {key: request.headers[key] for key in _FORWARDED_HEADERS if key in request.headers}


def captured_headers(request: Request) -> dict[str, str]:
    """The inference id a client sent (SageMaker's ``InferenceId``): capture keeps it for live accuracy."""
    inference_id = request.headers.get("x-amzn-sagemaker-inference-id")
    return {"x-amzn-sagemaker-inference-id": inference_id} if inference_id else {}


def create_app(name: str, state_file: Path) -> Starlette:
    router = Router(name, state_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        router.reload()
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, router.reload)
        supervisor = asyncio.create_task(router.supervise())
        yield
        supervisor.cancel()
        await router.close()

    async def invocations(request: Request) -> Response:
        start = time.perf_counter()
        try:
            body = await httpio.read_body(request)
        except httpio.RequestError as error:
            return httpio.container_error(error.status, error.message)
        headers = forwarded_headers(request)
        answer, variant = await router.invoke("/invocations", headers, body)
        router.record(body, {**headers, **captured_headers(request)}, answer, variant, start)
        return answer

    async def runtime_invocations(request: Request) -> Response:
        endpoint = request.path_params["endpoint"]
        if endpoint != name:
            return httpio.unknown_endpoint(endpoint, name)
        start = time.perf_counter()
        try:
            body = await httpio.read_body(request)
        except httpio.RequestError as error:
            return httpio.runtime_error("ValidationError", error.status, error.message)
        headers = forwarded_headers(request)
        answer, variant = await router.invoke(f"/endpoints/{name}/invocations", headers, body)
        router.record(body, {**headers, **captured_headers(request)}, answer, variant, start)
        return answer

    async def ping(request: Request) -> Response:
        return await router.ping()

    async def status(request: Request) -> Response:
        return JSONResponse(router.status().to_dict())

    return Starlette(
        routes=[
            Route("/ping", ping, methods=["GET"]),
            Route("/invocations", invocations, methods=["POST"]),
            Route("/endpoints/{endpoint}/invocations", runtime_invocations, methods=["POST"]),
            Route("/router/status", status, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Stable front address of a local endpoint; runs its model hosts.")
    parser.add_argument("--name", required=True, help="endpoint name (for /endpoints/<name>/invocations)")
    parser.add_argument(
        "--state-file", type=Path, required=True, help="JSON: variants, current, candidate, split; re-read on SIGHUP"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (default: 8080)")
    parser.add_argument("--fd", type=int, default=None, help="serve on this inherited listening socket instead")
    parser.add_argument(
        "--graceful-timeout", type=float, default=30.0, help="seconds to drain on SIGTERM (default: 30)"
    )
    return parser


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(args.name, args.state_file)
    httpio.serve(app, httpio.bound_socket(args.host, args.port, args.fd), args.graceful_timeout, 1024)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
