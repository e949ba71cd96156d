"""What tasks retry: botocore's network-failure families and AWS throttling/5xx; never bad input."""

from __future__ import annotations

import botocore.exceptions as bx
import pytest
from prefect.states import Completed, Failed

from bincount.download import DownloadError
from bincount.manifest import ManifestError
from bincount.storage import ObjectNotFoundError, StorageError, TransientStorageError
from tasks.retry import is_transient, is_transient_error

URL = "https://s3.amazonaws.com/bucket/key"


def client_error(code: str, status: int) -> bx.ClientError:
    return bx.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


TRANSIENT = [
    TransientStorageError("s3://b/k: S3 kept answering SlowDown"),
    bx.ConnectionClosedError(endpoint_url=URL),
    bx.ResponseStreamingError(error="Connection broken: IncompleteRead(10 bytes read)"),
    bx.ReadTimeoutError(endpoint_url=URL),
    bx.ConnectTimeoutError(endpoint_url=URL),
    bx.EndpointConnectionError(endpoint_url=URL),
    bx.IncompleteReadError(actual_bytes=10, expected_bytes=20),
    client_error("SlowDown", 503),
    client_error("ThrottlingException", 400),
    client_error("InternalError", 500),
]
PERMANENT = [
    bx.SSLError(endpoint_url=URL, error="certificate verify failed"),
    bx.NoCredentialsError(),
    bx.ParamValidationError(report="Invalid bucket name"),
    client_error("AccessDenied", 403),
    client_error("ValidationException", 400),
    ObjectNotFoundError("no object at s3://b/k"),
    StorageError("access denied"),
    ManifestError("bad manifest"),
    DownloadError("too many missing"),
    ValueError("bad input"),
    KeyError("bug"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_network_failures_throttling_and_5xx_are_retried(error: BaseException) -> None:
    assert is_transient_error(error)


@pytest.mark.parametrize("error", PERMANENT, ids=lambda e: type(e).__name__)
def test_bad_input_credentials_and_bugs_are_not_retried(error: BaseException) -> None:
    assert not is_transient_error(error)


def test_retry_condition_reads_the_failed_states_exception() -> None:
    assert is_transient(None, None, Failed(data=bx.ConnectionClosedError(endpoint_url=URL)))
    assert not is_transient(None, None, Failed(data=ValueError("bad input")))
    assert not is_transient(None, None, Completed(data=1))
