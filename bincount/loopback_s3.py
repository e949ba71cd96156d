"""A real S3 HTTP API on loopback (moto's server app) with added latency and injected faults.

For tests, benchmarks and offline trials of the S3 code path: boto3 talks to it over HTTP exactly
as to AWS. ``latency_s`` delays every request (to stand for S3's round trip); ``fail_next``
makes requests whose path contains a substring answer an HTTP error a number of times.

    python -m bincount.loopback_s3 --port 5055 --latency-ms 20    # serve until Ctrl-C
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

_ERROR_CODES = {500: "InternalError", 503: "SlowDown"}


class LoopbackS3:
    """Start with ``with LoopbackS3() as s3: boto3.client("s3", endpoint_url=s3.endpoint_url)``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)

        self.latency_s = latency_s
        self.requests = 0
        self._faults: list[list[Any]] = []  # [path substring, times left, status]
        self._lock = threading.Lock()
        self._backend = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(host, port, self._app, threaded=True)
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self._server.host}:{self._server.port}"

    def fail_next(self, path_contains: str, times: int, status: int = 503) -> None:
        """Answer ``status`` to the next ``times`` requests whose path contains ``path_contains``."""
        with self._lock:
            self._faults.append([path_contains, times, status])

    def _app(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        with self._lock:
            self.requests += 1
            fault = next((f for f in self._faults if f[1] > 0 and f[0] in environ.get("PATH_INFO", "")), None)
            if fault:
                fault[1] -= 1
        if self.latency_s:
            time.sleep(self.latency_s)
        if fault:
            status = fault[2]
            code = _ERROR_CODES.get(status, "ServiceUnavailable")
            body = f"<Error><Code>{code}</Code><Message>injected fault</Message></Error>".encode()
            start_response(
                f"{status} {code}", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
            )
            return [body]
        return self._backend(environ, start_response)

    def start(self) -> LoopbackS3:
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-s3", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LoopbackS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5055, help="port (default: 5055)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every request (default: 0)")
    args = parser.parse_args()
    server = LoopbackS3(args.host, args.port, latency_s=args.latency_ms / 1000)
    print(f"S3 API at {server.endpoint_url} (latency {args.latency_ms} ms); Ctrl-C stops it", flush=True)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
