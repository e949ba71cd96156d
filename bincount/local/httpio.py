"""HTTP pieces shared by the model host and the router: sockets, the server, body limits and SageMaker-shaped errors.

Two kinds of route answer errors differently, as on SageMaker:
- container routes (``/ping``, ``/invocations``) answer the model's own status and a JSON message;
- the runtime route (``/endpoints/<name>/invocations``) answers like the ``sagemaker-runtime``
  service, so boto3 raises its modelled exceptions: a model's 4xx/5xx becomes ``ModelError`` (424)
  with ``OriginalStatusCode`` and ``OriginalMessage``; an unknown endpoint is ``ValidationError``.
"""

from __future__ import annotations

import json
import socket

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # SageMaker real-time endpoints refuse bigger bodies


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: Request, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """The request body, refused (413) as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length")
    too_large = RequestError(
        413, f"the body is over the {limit // (1024 * 1024)} MB limit of a real-time endpoint: use batch transform"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(400, "the client went away before sending the whole body") from None
    return b"".join(chunks)


def container_error(status: int, message: str) -> Response:
    return Response(json.dumps({"error": message}), status_code=status, media_type="application/json")


def runtime_error(code: str, status: int, message: str) -> Response:
    """An error shaped like the sagemaker-runtime service's (botocore reads the type header)."""
    return Response(
        json.dumps({"Message": message}),
        status_code=status,
        media_type="application/json",
        headers={"x-amzn-ErrorType": code},
    )


def model_error(name: str, status: int, message: str) -> Response:
    """The runtime's answer when the model container answered ``status`` (boto3's ``ModelError``)."""
    kind = "client" if status < 500 else "server"
    return Response(
        json.dumps(
            {
                "Message": f'Received {kind} error ({status}) from primary with message "{message}". '
                f"See the endpoint's log for {name}.",
                "OriginalStatusCode": status,
                "OriginalMessage": message,
            }
        ),
        status_code=424,
        media_type="application/json",
        headers={"x-amzn-ErrorType": "ModelError"},
    )


def unknown_endpoint(name: str, served: str) -> Response:
    return runtime_error("ValidationError", 400, f"Endpoint {name} not found: this server serves {served!r}.")


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: any free port) and listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    return sock


def bound_socket(host: str, port: int, fd: int | None) -> socket.socket:
    """The listening socket: inherited (``fd``, bound by the deployer) or bound here."""
    return socket.socket(fileno=fd) if fd is not None else listening_socket(host, port)


def serve(
    app: Starlette, sock: socket.socket, graceful_timeout_s: float, limit_concurrency: int, access_log: bool = False
) -> None:
    """Run ``app`` on an already bound socket until SIGTERM or SIGINT, then drain and return."""
    config = uvicorn.Config(
        app,
        log_level="info",
        access_log=access_log,
        timeout_keep_alive=75,  # longer than any client pool keeps idle connections: no reuse race
        timeout_graceful_shutdown=graceful_timeout_s,
        limit_concurrency=limit_concurrency,  # beyond this uvicorn answers 503 instead of queueing without end
        lifespan="on",
    )
    uvicorn.Server(config).run(sockets=[sock])
