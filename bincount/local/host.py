"""The model host: one model behind SageMaker's container routes, run as its own process.

    python -m bincount.local.host --model-dir DIR --name NAME [--port 8080 | --fd N]

Routes: ``GET /ping`` (200 once the model is loaded; its ``serving`` says which path serves, optimized
or eager; the log says why), ``POST /invocations`` and the runtime route
``POST /endpoints/<name>/invocations`` (so boto3's ``sagemaker-runtime`` client works with
``endpoint_url=``). Handlers come from ``sm_scripts/inference.py``: requests are decoded on a
small thread pool, then :class:`~bincount.local.batcher.MicroBatcher` runs one forward at a
time over the requests that arrived together. Bad requests get a 4xx and change nothing else;
SIGTERM stops accepting, answers every request already in, then exits. With ``--parent-pid``
(the router gives its own) the host also stops so once that process is no longer its parent: a
router killed with SIGKILL cannot stop its replicas, which would otherwise hold their ports and
their models' memory until the machine restarts.

Threads: torch uses ``--threads`` (default: the cores this process may use) for the one forward
in flight; decoding uses at most as many threads as cores, so the two never multiply.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bincount.local import httpio
from bincount.local.batcher import MicroBatcher, available_cores
from sm_scripts import inference

logger = logging.getLogger("bincount.local.host")


@dataclass(frozen=True)
class HostOptions:
    """How a host runs its model (defaults suit a CPU machine; see benchmarks/serve_endpoint.py)."""

    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    threads: int | None = None  # torch threads; None: every core this process may use
    graceful_timeout_s: float = 30.0
    nice: int = 5
    """CPU priority below the router's: its one event loop carries every replica's requests and needs little
    CPU, so it must not wait behind forwards (measured: benchmarks/rollout.py; docs/BENCHMARKS.md, "Rollouts and
    replicas")."""

    @property
    def max_in_flight(self) -> int:
        """Requests the router keeps on one replica (more wait in the router, first come first served): a batch
        in its forward and half of the next one decoding. Fewer starve the batches; more make each replica a
        queue of its own, where a request waits behind its replica's slowest moment."""
        return self.max_batch_size + max(1, self.max_batch_size // 2)

    def cli_args(self) -> list[str]:
        args = ["--max-batch-size", str(self.max_batch_size), "--max-wait-ms", str(self.max_wait_ms)]
        if self.threads:
            args += ["--threads", str(self.threads)]
        return [*args, "--graceful-timeout", str(self.graceful_timeout_s), "--nice", str(self.nice)]


class ModelHost:
    """One model behind SageMaker's container routes: requests decoded on a thread pool, forwards micro-batched."""

    def __init__(self, model_dir: Path, name: str, options: HostOptions) -> None:
        self.model_dir, self.name, self.options = model_dir, name, options
        self.threads = options.threads or available_cores()
        self.decode_limiter = anyio.CapacityLimiter(max(1, self.threads))
        self.model: inference.CountModel | None = None
        self.batcher: MicroBatcher | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Load the model before the first request is accepted; stop the batcher once every request is answered."""
        torch.set_num_threads(self.threads)
        model = self.model = inference.model_fn(str(self.model_dir))
        self.batcher = MicroBatcher(
            lambda pixels: inference.forward(pixels, model),
            max_batch_size=self.options.max_batch_size,
            max_wait_s=self.options.max_wait_ms / 1000.0,
            threads=self.threads,
        )
        self.batcher.start()
        logger.info(
            "serving %s (%s, %d px, %s) as %r: batches of up to %d, wait %.1f ms, %d threads",
            self.model_dir,
            model.info["arch"],
            model.image_size,
            model.serving["path"],
            self.name,
            self.options.max_batch_size,
            self.options.max_wait_ms,
            self.threads,
        )
        yield
        self.batcher.stop()  # uvicorn has answered every request by now
        logger.info("stopped after %d batches, %d images", self.batcher.batches, self.batcher.images)

    def decode(self, body: bytes, content_type: str) -> torch.Tensor:
        return inference.preprocess(inference.input_fn(body, content_type), self.model)

    async def predict(self, request: Request) -> Response:
        """Answer one invocation; raises RequestError for anything the client must fix."""
        assert self.batcher is not None  # set up in lifespan, before any request
        self.batcher.expect()
        submitted = False
        try:
            accept, pixels = await self._read(request)
            submitted = True
            predictions = await self.batcher.submit(pixels)
        finally:
            if not submitted:
                self.batcher.unexpect()
        answer, content_type = inference.output_fn(predictions, accept)
        return Response(answer, headers={"content-type": content_type})  # as output_fn says, no charset added

    async def _read(self, request: Request) -> tuple[str, torch.Tensor]:
        """The answer's media type and the request's decoded pixels; a RequestError for bad input."""
        try:
            accept = inference.choose_accept(request.headers.get("accept"))
            body = await httpio.read_body(request)
            if not body:
                raise httpio.RequestError(
                    400, "the body is empty: send a JPEG or PNG image, or JSON with base64 images"
                )
            pixels = await anyio.to_thread.run_sync(
                self.decode, body, request.headers.get("content-type", ""), limiter=self.decode_limiter
            )
        except inference.InputError as error:
            raise httpio.RequestError(error.status_code, str(error)) from None
        return accept, pixels

    async def invocations(self, request: Request) -> Response:
        try:
            return await self.predict(request)
        except httpio.RequestError as error:
            return httpio.container_error(error.status, error.message)
        except Exception as error:  # a fault of the model, not of the request: 500, and serve on
            logger.exception("invocation failed")
            return httpio.container_error(500, f"the model failed on this request: {type(error).__name__}: {error}")

    async def runtime_invocations(self, request: Request) -> Response:
        if request.path_params["endpoint"] != self.name:
            return httpio.unknown_endpoint(request.path_params["endpoint"], self.name)
        try:
            response = await self.predict(request)
        except httpio.RequestError as error:
            if error.status == 413:
                return httpio.runtime_error("ValidationError", 413, error.message)
            return httpio.model_error(self.name, error.status, error.message)
        except Exception as error:  # a fault of the model, not of the request: 500, and serve on
            logger.exception("invocation failed")
            message = f"the model failed on this request: {type(error).__name__}: {error}"
            return httpio.model_error(self.name, 500, message)
        response.headers["x-Amzn-Invoked-Production-Variant"] = "AllTraffic"
        return response

    async def ping(self, request: Request) -> Response:
        assert self.model is not None
        model = self.model
        body = {"status": "Healthy", "name": self.name, "arch": model.info["arch"], "serving": model.serving["path"]}
        return Response(json.dumps(body), media_type="application/json")


def create_app(model_dir: Path, name: str, options: HostOptions) -> Starlette:
    """The host's ASGI app; the model loads at startup, before the first request is accepted."""
    host = ModelHost(model_dir, name, options)
    return Starlette(
        routes=[
            Route("/ping", host.ping, methods=["GET"]),
            Route("/invocations", host.invocations, methods=["POST"]),
            Route("/endpoints/{endpoint}/invocations", host.runtime_invocations, methods=["POST"]),
        ],
        lifespan=host.lifespan,
    )


def stop_when_orphaned(parent_pid: int, check_every_s: float = 1.0) -> None:
    """SIGTERM to this process (the draining stop) once its parent is no longer ``parent_pid``: on Linux an
    orphan is adopted by init or a subreaper, so its parent id changes when the parent dies, however it died."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(check_every_s)
        logger.warning("the process that started this host (pid %d) is gone: stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stop-when-orphaned", daemon=True).start()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve one bin-count model with SageMaker's container routes.")
    parser.add_argument("--model-dir", type=Path, required=True, help="folder with model.pt and model_info.json")
    parser.add_argument(
        "--name", default="local", help="endpoint name for /endpoints/<name>/invocations (default: local)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind (default: 8080)")
    parser.add_argument("--fd", type=int, default=None, help="serve on this inherited listening socket instead")
    parser.add_argument(
        "--max-batch-size", type=int, default=HostOptions.max_batch_size, help="images per forward (default: 8)"
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=HostOptions.max_wait_ms, help="longest wait to fill a batch (default: 5)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores available)")
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=HostOptions.graceful_timeout_s,
        help="seconds to drain on SIGTERM (default: 30)",
    )
    parser.add_argument(
        "--nice", type=int, default=HostOptions.nice, help="CPU priority below the caller's (default: 5)"
    )
    parser.add_argument("--access-log", action="store_true", help="log every request (default: off)")
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="drain and exit once this process is no longer the parent"
    )
    return parser


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.nice(args.nice)  # before any thread starts: threads take their creator's priority
    options = HostOptions(args.max_batch_size, args.max_wait_ms, args.threads, args.graceful_timeout, args.nice)
    app = create_app(args.model_dir, args.name, options)
    if args.parent_pid is not None:
        stop_when_orphaned(args.parent_pid)
    httpio.serve(
        app, httpio.bound_socket(args.host, args.port, args.fd), options.graceful_timeout_s, 512, args.access_log
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
