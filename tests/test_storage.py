"""The storage layer against the local filesystem and a real S3 API on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bincount.storage import ObjectNotFoundError, Storage, StorageError, TransientStorageError, folder_digests


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


def test_the_cache_listing_of_an_s3_channel_changes_when_a_multipart_object_is_replaced_by_one_of_the_same_size(
    s3_server, s3_client, bucket: str, tmp_path: Path
) -> None:
    from boto3.s3.transfer import TransferConfig

    from bincount.config import Settings
    from tasks.caching import listing

    settings = Settings.load(artifact_root=f"{bucket}/artifacts", s3_endpoint_url=s3_server.endpoint_url)
    multipart = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    photo = tmp_path / "photo.jpg"
    listings = []
    for fill in (b"a", b"b"):  # 6 MiB each: two parts, an ETag that is no MD5
        photo.write_bytes(fill * (6 * 2**20))
        s3_client.upload_file(str(photo), "storage-tests", "channel/1/photo.jpg", Config=multipart)
        listings.append(listing(settings, f"{bucket}/channel"))
    ((uri, size, etag),) = listings[0]
    assert (uri, size) == (f"{bucket}/channel/1/photo.jpg", 6 * 2**20) and etag is not None and "-" in etag
    assert listings[1] != listings[0]


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


def test_staging_refuses_keys_that_climb_out_of_the_scratch_folder(
    s3_server, bucket: str, s3_client, tmp_path: Path
) -> None:
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url)
    storage.write_bytes(f"{bucket}/chan/1/a.jpg", b"a")
    s3_client.put_object(Bucket="storage-tests", Key="chan/1/../../../evil.jpg", Body=b"evil")
    with pytest.raises(StorageError, match=r"cannot stage .*'1/\.\./\.\./\.\./evil\.jpg' is not a plain relative key"):
        storage.local_folder(f"{bucket}/chan", tmp_path / "deep" / "scratch")
    assert not list(tmp_path.rglob("evil.jpg"))


def test_local_writes_reach_the_disk_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash right after the rename must not leave an empty file under the final name."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "model.json"
    Storage().write_bytes(target.as_uri(), b"{}")
    assert len(synced) == 2
    assert synced[0].startswith(str(tmp_path / ".tmp-model.json."))  # the data, under its temporary name
    assert synced[1] == str(tmp_path)  # then the folder, so that the rename itself is durable


def test_folder_digests_see_a_same_size_replacement_and_reread_nothing_unchanged(tmp_path: Path) -> None:
    channel, cache = tmp_path / "channel", tmp_path / "cache"
    (channel / "1").mkdir(parents=True)
    photo = channel / "1" / "a.jpg"
    photo.write_bytes(b"first photo")
    (channel / "1" / "b.jpg").write_bytes(b"another one")
    first = folder_digests(channel, cache)
    (cache_file,) = cache.iterdir()
    written = cache_file.stat().st_mtime_ns
    assert folder_digests(channel, cache) == first and cache_file.stat().st_mtime_ns == written  # nothing new to hash

    stat = photo.stat()
    photo.write_bytes(b"other photo")  # same size; even with the old mtime put back, ctime moves
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = folder_digests(channel, cache)
    assert second[photo.as_uri()] != first[photo.as_uri()]
    assert second[(channel / "1" / "b.jpg").as_uri()] == first[(channel / "1" / "b.jpg").as_uri()]
