"""One storage layer for ``file://`` and ``s3://`` URIs; no stage opens paths its own way.

S3 clients come from :func:`s3_client` only. Transient S3 errors (5xx, throttling, timeouts,
dropped connections) are retried by botocore's ``standard`` retry mode, which backs off
exponentially with full jitter; what is still failing after that surfaces as
:class:`TransientStorageError`, and a missing object as :class:`ObjectNotFoundError`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlparse

import boto3
import botocore.config
import botocore.exceptions
from botocore import UNSIGNED

from bincount.config import Settings
from bincount.ids import UnsafeNameError, check_key

S3_MAX_ATTEMPTS = 8
_CHUNK = 1024 * 1024


class StorageError(RuntimeError):
    """Reading or writing a URI failed for a reason that retrying will not fix."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """The URI names no object."""


class TransientStorageError(StorageError):
    """The store kept failing after botocore's retries (5xx, throttling, timeouts): try again later."""


class ObjectTooLargeError(StorageError):
    """The object is larger than the reader allows (``max_bytes``); the message names it and the cap."""


class LockedError(StorageError):
    """Another process holds the lock; the message names it."""


TRANSIENT_BOTOCORE_ERRORS = (
    botocore.exceptions.ConnectionError,  # refused, connect timeouts, endpoint unreachable, proxy
    botocore.exceptions.HTTPClientError,  # read timeouts, ConnectionClosedError, ResponseStreamingError
    botocore.exceptions.IncompleteReadError,
)
"""botocore's families of network failures: the request may well succeed when sent again."""


def is_transient_botocore_error(error: BaseException) -> bool:
    """Whether a botocore exception is a network failure worth retrying (a TLS certificate problem is not)."""
    return isinstance(error, TRANSIENT_BOTOCORE_ERRORS) and not isinstance(error, botocore.exceptions.SSLError)


@dataclass(frozen=True)
class ObjectInfo:
    """An object found by :meth:`Storage.list`. ``etag``: S3's (a content fingerprint: the MD5 of a
    single-part upload, a digest of the parts' MD5s for a multipart one); ``md5``: the ETag where it is
    the content's MD5 (single-part uploads only)."""

    uri: str
    size: int
    md5: str | None = None
    etag: str | None = None


def join_uri(base: str, *parts: str) -> str:
    """Join URI path segments with single slashes."""
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts if part)])


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri!r} is not an s3://<bucket>/<key> URI")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str) -> Path:
    """The filesystem path of a ``file://`` URI."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise StorageError(f"{uri!r} is not a file:// URI")
    return Path(unquote(parsed.path))


def s3_client(
    endpoint_url: str | None = None,
    anonymous: bool = False,
    region: str | None = None,
    max_attempts: int = S3_MAX_ATTEMPTS,
    max_pool_connections: int = 64,
):
    """The one factory for S3 clients (thread-safe; share one per :class:`Storage`)."""
    config = botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
        connect_timeout=10,
        read_timeout=60,
        signature_version=UNSIGNED if anonymous else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _raise_for_client_error(error: botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError, uri: str):
    if isinstance(error, botocore.exceptions.ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "404", "NotFound"):
            raise ObjectNotFoundError(f"no object at {uri}") from error
        if code == "NoSuchBucket":
            raise ObjectNotFoundError(f"no bucket for {uri}: check the bucket name and the S3 endpoint") from error
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(
                f"access denied to {uri}: check the AWS credentials and the bucket policy "
                "(a private source bucket needs BINCOUNT_SOURCE_ANONYMOUS=false)"
            ) from error
        if status >= 500 or code in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"):
            raise TransientStorageError(f"{uri}: S3 kept answering {code or status} after retries") from error
        raise StorageError(f"{uri}: S3 answered {code or status}: {error}") from error
    if is_transient_botocore_error(error):  # it outlasted botocore's own retries
        raise TransientStorageError(f"{uri}: {type(error).__name__}: {error}") from error
    raise StorageError(f"{uri}: {type(error).__name__}: {error} (check the AWS credentials and settings)") from error


def storage_for(settings: Settings, *, source: bool = False) -> Storage:
    """The storage for the artifact root, or (``source=True``) for the data source bucket.

    The source is read anonymously when ``source_anonymous`` says so (the public ABID bucket),
    except when it lies in the artifact root's own bucket (the demo bucket ``bincount demo``
    writes there): the project's own buckets are read with its own credentials.
    """
    source_bucket, root_bucket = urlparse(settings.source_uri), urlparse(settings.artifact_root)
    own_bucket = source_bucket.scheme == root_bucket.scheme == "s3" and source_bucket.netloc == root_bucket.netloc
    return Storage(
        s3_endpoint_url=settings.s3_endpoint_url,
        anonymous=source and settings.source_anonymous and not own_bucket,
        region=settings.aws_region,
    )


class Storage:
    """Read, write and list objects by URI. One instance per set of S3 options; thread-safe."""

    def __init__(
        self,
        s3_endpoint_url: str | None = None,
        anonymous: bool = False,
        region: str | None = None,
        max_attempts: int = S3_MAX_ATTEMPTS,
        max_pool_connections: int = 64,
    ) -> None:
        self._client_options = {
            "endpoint_url": s3_endpoint_url,
            "anonymous": anonymous,
            "region": region,
            "max_attempts": max_attempts,
            "max_pool_connections": max_pool_connections,
        }

    @cached_property
    def s3(self):
        return s3_client(**self._client_options)

    def read_bytes(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The object at ``uri``, whole.

        ``max_bytes``: refuse an object larger than this (:class:`ObjectTooLargeError`) before holding it:
        its stated size (the file's, S3's ``Content-Length``) is checked first, then the body is read in
        chunks and dropped as soon as it passes the cap (whatever size was stated).
        """
        if uri.startswith("file://"):
            path = local_path(uri)
            if not path.is_file():
                raise ObjectNotFoundError(f"no file at {uri}")
            if max_bytes is None:
                return path.read_bytes()
            _check_size(uri, path.stat().st_size, max_bytes)
            with path.open("rb") as handle:
                return read_capped(iter(lambda: handle.read(_CHUNK), b""), uri, max_bytes)
        bucket, key = split_s3_uri(uri)
        try:
            response = self.s3.get_object(Bucket=bucket, Key=key)
            if max_bytes is None:
                return response["Body"].read()
            body = response["Body"]
            try:
                _check_size(uri, response.get("ContentLength"), max_bytes)
                return read_capped(body.iter_chunks(_CHUNK), uri, max_bytes)
            except ObjectTooLargeError:
                body.close()  # the connection is dropped: the rest of the object is never transferred
                raise
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            _raise_for_client_error(error, uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write ``data`` at ``uri``; a local file appears whole under its name or not at all."""
        if uri.startswith("file://"):
            atomic_write_bytes(local_path(uri), data)
            return
        bucket, key = split_s3_uri(uri)
        try:
            self.s3.put_object(Bucket=bucket, Key=key, Body=data)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            _raise_for_client_error(error, uri)

    def create_new(self, uri: str, data: bytes) -> bool:
        """Write ``data`` at ``uri`` only if nothing is there; False when something is.

        A reader sees the whole object or none. Locally a finished temporary file is hard-linked to the
        name (the link fails if the name exists); on S3 ``PutObject`` carries ``If-None-Match: *``.
        """
        if uri.startswith("file://"):
            try:
                with _atomic_file(local_path(uri), exclusive=True) as target:
                    target.write(data)
            except FileExistsError:
                return False
            return True
        bucket, key = split_s3_uri(uri)
        try:
            self.s3.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except botocore.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            # 412: the key exists. 409: another conditional write of the key is in flight; one of the two wins.
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            if code == "NotImplemented":
                raise StorageError(
                    f"{uri}: this S3 endpoint refuses conditional writes (If-None-Match): use AWS S3, MinIO or a "
                    "recent LocalStack"
                ) from error
            _raise_for_client_error(error, uri)
        except botocore.exceptions.BotoCoreError as error:
            _raise_for_client_error(error, uri)
        return True

    def upload_file(self, path: Path, uri: str) -> None:
        if uri.startswith("file://"):
            destination = local_path(uri)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with path.open("rb") as source, _atomic_file(destination) as target:
                shutil.copyfileobj(source, target, _CHUNK)
            return
        bucket, key = split_s3_uri(uri)
        try:
            self.s3.upload_file(str(path), bucket, key)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            _raise_for_client_error(error, uri)
        except boto3.exceptions.S3UploadFailedError as error:
            raise TransientStorageError(f"upload of {path} to {uri} failed: {error}") from error

    def download_file(self, uri: str, path: Path) -> None:
        """Copy the object at ``uri`` to ``path`` (atomically, streamed: constant memory)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if uri.startswith("file://"):
            source_path = local_path(uri)
            if not source_path.is_file():
                raise ObjectNotFoundError(f"no file at {uri}")
            with source_path.open("rb") as source, _atomic_file(path) as target:
                shutil.copyfileobj(source, target, _CHUNK)
            return
        bucket, key = split_s3_uri(uri)
        try:
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
            with _atomic_file(path) as target:
                for chunk in body.iter_chunks(_CHUNK):
                    target.write(chunk)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            _raise_for_client_error(error, uri)

    def local_folder(self, prefix_uri: str, scratch: Path) -> Path:
        """A local folder holding what is under ``prefix_uri``: a ``file://`` prefix is read in place,
        any other is copied into ``scratch`` first (as SageMaker stages a channel in File mode)."""
        if prefix_uri.startswith("file://"):
            return local_path(prefix_uri)
        prefix = prefix_uri.rstrip("/") + "/"
        for item in self.list(prefix_uri):
            key = item.uri[len(prefix) :]
            if key.endswith("/"):
                continue  # a console-made "folder" marker, not a file
            try:
                check_key(key, f"object under {prefix_uri}")
            except UnsafeNameError as error:
                raise StorageError(f"cannot stage {prefix_uri}: {error}") from None
            self.download_file(item.uri, scratch / key)
        return scratch

    def exists(self, uri: str) -> bool:
        if uri.startswith("file://"):
            return local_path(uri).is_file()
        bucket, key = split_s3_uri(uri)
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            return True
        except botocore.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            _raise_for_client_error(error, uri)
        except botocore.exceptions.BotoCoreError as error:
            _raise_for_client_error(error, uri)

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix_uri`` (recursively), as a stream: listing a million keys stays small."""
        if prefix_uri.startswith("file://"):
            root = local_path(prefix_uri)
            if not root.is_dir():
                return
            for directory, _, names in os.walk(root):
                for name in sorted(names):
                    if name.startswith(".tmp-"):
                        continue
                    path = Path(directory) / name
                    yield ObjectInfo(uri=path.as_uri(), size=path.stat().st_size)
            return
        bucket, prefix = split_s3_uri(prefix_uri)
        if prefix:
            prefix = prefix.rstrip("/") + "/"
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    etag = item.get("ETag", "").strip('"')
                    yield ObjectInfo(
                        uri=f"s3://{bucket}/{item['Key']}",
                        size=int(item["Size"]),
                        md5=etag if etag and "-" not in etag else None,
                        etag=etag or None,
                    )
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            _raise_for_client_error(error, prefix_uri)

    def delete(self, uri: str) -> None:
        if uri.startswith("file://"):
            local_path(uri).unlink(missing_ok=True)
            return
        bucket, key = split_s3_uri(uri)
        try:
            self.s3.delete_object(Bucket=bucket, Key=key)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
            _raise_for_client_error(error, uri)


def _check_size(uri: str, size: int | None, max_bytes: int) -> None:
    if size is not None and size > max_bytes:
        raise ObjectTooLargeError(f"{uri} is {size} bytes, over the cap of {max_bytes} bytes for one object: not read")


def read_capped(chunks: Iterable[bytes], uri: str, max_bytes: int) -> bytes:
    """Join ``chunks`` (a body being streamed), or raise :class:`ObjectTooLargeError` as soon as they pass
    ``max_bytes``: at most one chunk beyond the cap is ever held."""
    parts, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise ObjectTooLargeError(
                f"{uri} streamed more than the cap of {max_bytes} bytes for one object (its stated size was "
                "lower, or missing): reading stopped there"
            )
        parts.append(chunk)
    return b"".join(parts)


@contextmanager
def _atomic_file(path: Path, exclusive: bool = False) -> Iterator[IO[bytes]]:
    """A temporary file beside ``path``, renamed onto ``path`` on success and removed on failure.

    ``exclusive``: hard-linked to ``path`` instead, so it raises FileExistsError if ``path`` exists.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as target:
            yield target
            target.flush()
            os.fsync(target.fileno())  # the data is on disk before the name points at it
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # and so is the rename
        finally:
            os.close(directory)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file under that name."""
    with _atomic_file(path) as target:
        target.write(data)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file (``sha256`` for checksums, ``md5`` to compare with an S3 ETag)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


@contextmanager
def file_lock(path: Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold ``path`` as an exclusive lock across processes (``flock``: released when the holder dies).

    The holder writes who it is into the file. A second caller waits up to ``wait_s`` seconds
    (``None``: as long as it takes), then raises :class:`LockedError` naming the holder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+") as handle:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise LockedError(
                        f"{path.parent} is in use by {holder} (lock {path}): wait until it finishes, "
                        "or give this run a folder of its own"
                    ) from None
                time.sleep(0.1)
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}")
        handle.flush()
        yield


DIGEST_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bincount" / "digests"


def folder_digests(folder: Path, cache_dir: Path = DIGEST_CACHE_DIR) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (skipping ``.tmp-*``), by ``file://`` URI.

    A file is read only when its size, mtime, ctime or inode changed since the last call: the
    digests are kept in ``cache_dir``, one JSON file per folder, so an unchanged re-run reads
    nothing, while a photo replaced by another of the same size is hashed again.
    """
    cache = cache_dir / f"{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]}.json"
    try:
        known = json.loads(cache.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        known = {}
    seen: dict[str, list] = {}
    for info in Storage().list(folder.as_uri()):
        path = local_path(info.uri)
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        entry = known.get(info.uri)
        seen[info.uri] = entry if entry and entry[0] == stamp else [stamp, file_digest(path)]
    if seen != known:
        atomic_write_bytes(cache, json.dumps(seen).encode())
    return {uri: digest for uri, (_, digest) in seen.items()}
