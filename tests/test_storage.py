"""The storage layer against the local filesystem and a real S3 API on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from bincount.storage import ObjectNotFoundError, Storage, TransientStorageError


@pytest.fixture
def bucket(s3_client) -> str:
    s3_client.create_bucket(Bucket="storage-tests")
    return "s3://storage-tests"


def test_s3_round_trip_list_and_delete(s3_server, bucket: str, tmp_path: Path) -> None:
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url)
    storage.write_bytes(f"{bucket}/a/one.bin", b"1")
    source = tmp_path / "two.bin"
    source.write_bytes(b"22")
    storage.upload_file(source, f"{bucket}/a/b/two.bin")
    listed = {info.uri: info.size for info in storage.list(f"{bucket}/a")}
    assert listed == {f"{bucket}/a/one.bin": 1, f"{bucket}/a/b/two.bin": 2}
    storage.download_file(f"{bucket}/a/b/two.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == b"22"
    staged = storage.local_folder(f"{bucket}/a", tmp_path / "staged")
    assert sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()) == ["b/two.bin", "one.bin"]
    assert storage.local_folder(tmp_path.as_uri(), tmp_path / "unused") == tmp_path
    storage.delete(f"{bucket}/a/one.bin")
    assert not storage.exists(f"{bucket}/a/one.bin")
    with pytest.raises(ObjectNotFoundError):
        storage.read_bytes(f"{bucket}/a/one.bin")


def test_local_write_is_atomic_and_listing_skips_temporaries(tmp_path: Path) -> None:
    storage = Storage()
    storage.write_bytes((tmp_path / "x" / "y.txt").as_uri(), b"hello")
    (tmp_path / "x" / ".tmp-z.txt.abc").write_bytes(b"partial")
    assert [info.uri for info in storage.list(tmp_path.as_uri())] == [(tmp_path / "x" / "y.txt").as_uri()]
    with pytest.raises(ObjectNotFoundError):
        storage.read_bytes((tmp_path / "missing").as_uri())


def test_transient_errors_are_retried_then_reported(s3_server, bucket: str) -> None:
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url)
    storage.write_bytes(f"{bucket}/flaky.bin", b"ok")
    s3_server.fail_next("flaky.bin", times=3)
    assert storage.read_bytes(f"{bucket}/flaky.bin") == b"ok"
    impatient = Storage(s3_endpoint_url=s3_server.endpoint_url, max_attempts=2)
    s3_server.fail_next("flaky.bin", times=2)
    with pytest.raises(TransientStorageError, match="SlowDown"):
        impatient.read_bytes(f"{bucket}/flaky.bin")
