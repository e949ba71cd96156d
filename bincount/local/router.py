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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bincount.local import httpio

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

    def reload(self) -> None:
        """Point at the target named in the state file (switching is atomic: one event loop)."""
        state = json.loads(self.state_file.read_text())
        target = state["target"].rstrip("/")
        if target != self.target:
            logger.info("endpoint %s now forwards to %s (model %s)", self.name, target, state.get("version"))
        self.target, self.version, self.model_ref = target, state.get("version"), state.get("model_ref")
        if target not in self._clients:
            # idle connections expire (5 s) long before the host drops them (75 s): no reuse race
            self._clients[target] = httpx.AsyncClient(
                base_url=target,
                timeout=httpx.Timeout(120.0, connect=5.0),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=5.0),
            )
            self.inflight[target] = 0

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


def create_app(name: str, state_file: Path) -> Starlette:
    router = Router(name, state_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        router.reload()
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, router.reload)
        yield
        await router.close()

    def forwarded_headers(request: Request) -> dict[str, str]:
        return {key: request.headers[key] for key in _FORWARDED_HEADERS if key in request.headers}

    async def invocations(request: Request) -> Response:
        try:
            body = await httpio.read_body(request)
        except httpio.RequestError as error:
            return httpio.container_error(error.status, error.message)
        return await router.forward("POST", "/invocations", forwarded_headers(request), body)

    async def runtime_invocations(request: Request) -> Response:
        endpoint = request.path_params["endpoint"]
        if endpoint != name:
            return httpio.unknown_endpoint(endpoint, name)
        try:
            body = await httpio.read_body(request)
        except httpio.RequestError as error:
            return httpio.runtime_error("ValidationError", error.status, error.message)
        return await router.forward("POST", f"/endpoints/{name}/invocations", forwarded_headers(request), body)

    async def ping(request: Request) -> Response:
        """The host's answer, with what the endpoint serves (SageMaker's contract: 200 and a small body)."""
        answer = await router.forward("GET", "/ping", {}, None)
        if answer.status_code != 200:
            return answer
        return JSONResponse({**json.loads(answer.body), "model_version": router.model_ref, "weights": router.version})

    async def status(request: Request) -> Response:
        await router.forget_drained()
        return JSONResponse(
            {"name": name, "target": router.target, "version": router.version, "inflight": router.inflight}
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
