"""The endpoint's front door: a stable address that forwards to whichever model host is live.

    python -m bincount.local.router --name NAME --state-file FILE [--port P | --fd N]

A local endpoint is this router plus one model host process (two during a redeploy). The router
owns the endpoint's URL, so clients never see a host come or go: a deploy starts the new host,
checks it, rewrites the state file (``{"target": "http://127.0.0.1:<port>", ...}``) and sends the
router SIGHUP. The router reads the file and sends every later request to the new host, while
requests already forwarded to the old one finish there. ``GET /ping`` answers with the registered
model version it serves (``model_version``, e.g. ``bincount:3``) and its weights. ``GET /router/status`` reports the
target and the requests in flight per host, so the deployer stops the old host only once it
has none left. Forwarding is the only thing a request costs here: bodies are checked against the
payload limit and passed through unchanged; answers come back as the host gave them.

Data capture (the state file's ``capture``: a :class:`~bincount.contracts.serving.CaptureConfig` and a
destination) happens here, at the front door: a sampled invocation's body, answer, status and latency
go to a :class:`~bincount.capture.CaptureWriter` queue after the answer is ready; SIGTERM drains
the queue into the files. ``/router/status`` reports the writer's counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bincount.capture import CaptureWriter, Exchange
from bincount.contracts.serving import CaptureConfig
from bincount.local import httpio
from bincount.storage import Storage

logger = logging.getLogger("bincount.local.router")

_FORWARDED_HEADERS = ("content-type", "accept", "x-amzn-sagemaker-custom-attributes")
_RETURNED_HEADERS = ("content-type", "x-amzn-errortype", "x-amzn-invoked-production-variant")


class Router:
    """Forwarding state: the current target and one connection pool per host still in use."""

    def __init__(self, name: str, state_file: Path) -> None:
        self.name = name
        self.state_file = state_file
        self.target: str | None = None
        self.version: str | None = None
        self.model_ref: str | None = None
        self.inflight: dict[str, int] = {}
        self._clients: dict[str, httpx.AsyncClient] = {}
        self.capture: CaptureWriter | None = None
        self._capture_key: str | None = None

    def reload(self) -> None:
        """Point at the target named in the state file (switching is atomic: one event loop)."""
        state = json.loads(self.state_file.read_text())
        target = state["target"].rstrip("/")
        if target != self.target:
            logger.info("endpoint %s now forwards to %s (model %s)", self.name, target, state.get("version"))
        self.target, self.version, self.model_ref = target, state.get("version"), state.get("model_ref")
        self._configure_capture(state.get("capture"))
        if target not in self._clients:
            # idle connections expire (5 s) long before the host drops them (75 s): no reuse race
            self._clients[target] = httpx.AsyncClient(
                base_url=target,
                timeout=httpx.Timeout(120.0, connect=5.0),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=5.0),
            )
            self.inflight[target] = 0

    def _configure_capture(self, capture: dict | None) -> None:
        """Start, change or stop the capture writer as the state file says (a changed one drains in the background)."""
        key = json.dumps(capture, sort_keys=True) if capture else None
        if key == self._capture_key:
            return
        old, self.capture, self._capture_key = self.capture, None, key
        if capture:
            config = CaptureConfig(**capture["config"])
            storage = Storage(s3_endpoint_url=capture.get("s3_endpoint_url"), region=capture.get("region"))
            self.capture = CaptureWriter(capture["destination"], config, storage)
            logger.info("capturing %d%% of requests to %s", config.sampling_percentage, capture["destination"])
        if old is not None:
            asyncio.get_running_loop().run_in_executor(None, old.close)

    def record(self, body: bytes, headers: dict[str, str], answer: Response, start: float) -> None:
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
                model_version=self.model_ref or self.version,
            )
        )

    async def forget_drained(self) -> None:
        """Close the pools of old hosts with nothing in flight."""
        for url in [url for url, count in self.inflight.items() if url != self.target and count == 0]:
            await self._clients.pop(url).aclose()
            del self.inflight[url]

    async def forward(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Response:
        if self.target is None:
            return httpio.container_error(503, f"endpoint {self.name} has no model host yet")
        target = self.target
        self.inflight[target] += 1  # counted before any await: a switch cannot slip in between
        try:
            answer = await self._clients[target].request(method, path, headers=headers, content=body)
        except httpx.TransportError as error:
            logger.error("host %s did not answer %s: %s", target, path, error)
            return httpio.container_error(502, f"the model host of endpoint {self.name} did not answer ({error})")
        finally:
            self.inflight[target] -= 1
        returned = {key: answer.headers[key] for key in _RETURNED_HEADERS if key in answer.headers}
        return Response(answer.content, status_code=answer.status_code, headers=returned)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        if self.capture is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.capture.close)


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
        yield
        await router.close()

    async def invocations(request: Request) -> Response:
        start = time.perf_counter()
        try:
            body = await httpio.read_body(request)
        except httpio.RequestError as error:
            return httpio.container_error(error.status, error.message)
        headers = forwarded_headers(request)
        answer = await router.forward("POST", "/invocations", headers, body)
        router.record(body, {**headers, **captured_headers(request)}, answer, start)
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
        answer = await router.forward("POST", f"/endpoints/{name}/invocations", headers, body)
        router.record(body, {**headers, **captured_headers(request)}, answer, start)
        return answer

    async def ping(request: Request) -> Response:
        """The host's answer, with what the endpoint serves (SageMaker's contract: 200 and a small body)."""
        answer = await router.forward("GET", "/ping", {}, None)
        if answer.status_code != 200:
            return answer
        return JSONResponse({**json.loads(answer.body), "model_version": router.model_ref, "weights": router.version})

    async def status(request: Request) -> Response:
        await router.forget_drained()
        capture = router.capture.stats.to_dict() if router.capture else None
        return JSONResponse(
            {
                "name": name,
                "target": router.target,
                "version": router.version,
                "inflight": router.inflight,
                "capture": capture,
            }
        )

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
    parser = argparse.ArgumentParser(
        description="Stable front address of a local endpoint; forwards to its model host."
    )
    parser.add_argument("--name", required=True, help="endpoint name (for /endpoints/<name>/invocations)")
    parser.add_argument(
        "--state-file", type=Path, required=True, help='JSON {"target": URL, "version": ...}; re-read on SIGHUP'
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
