"""The download stage against a real S3 API on loopback: real ABID images, bad objects, 503s, kills."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image
from waiting import wait_until

from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.download import (
    LOCK_NAME,
    MAX_OBJECT_BYTES,
    DownloadError,
    Ledger,
    bounded_map,
    check_image,
    download_images,
    image_path,
)
from bincount.ids import UnsafeNameError
from bincount.storage import LockedError, ObjectTooLargeError, Storage, file_digest, file_lock, read_capped

BUCKET = "s3://abid-sample"


def test_downloads_every_image_and_its_metadata_verified(
    s3_server, abid_bucket: dict[str, int], tmp_path: Path
) -> None:
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url, anonymous=True)
    report, downloaded = download_images(abid_bucket, BUCKET, tmp_path, storage, concurrency=16)
    assert (report.downloaded, report.already_present, report.missing, report.corrupt) == (len(abid_bucket), 0, [], {})
    for image_id, entry in downloaded.items():
        path = image_path(tmp_path, image_id)
        assert file_digest(path) == entry.sha256
        assert check_image(path.read_bytes())[0] > 0
        assert (tmp_path / "metadata" / f"{image_id}.json").is_file()
    again, _ = download_images(abid_bucket, BUCKET, tmp_path, storage, concurrency=16)
    assert (again.downloaded, again.already_present) == (0, len(abid_bucket))


@pytest.fixture
def faulty_bucket(s3_server, abid_dir: Path, abid_bucket: dict[str, int]) -> tuple[str, dict[str, int]]:
    """Ten good images, a corrupt one, a truncated one, and a manifest entry with no object."""
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    client.create_bucket(Bucket="abid-faults")
    good = list(abid_bucket)[:10]
    for image_id in good:
        client.upload_file(
            str(abid_dir / "bucket" / "bin-images" / f"{image_id}.jpg"), "abid-faults", f"bin-images/{image_id}.jpg"
        )
    whole = (abid_dir / "bucket" / "bin-images" / f"{good[0]}.jpg").read_bytes()
    client.put_object(Bucket="abid-faults", Key="bin-images/corrupt.jpg", Body=b"\x00\x01 not a jpeg" * 100)
    client.put_object(Bucket="abid-faults", Key="bin-images/truncated.jpg", Body=whole[: len(whole) // 2])
    manifest = {image_id: abid_bucket[image_id] for image_id in good} | {"corrupt": 1, "truncated": 2, "missing": 3}
    return "s3://abid-faults", manifest


def test_corrupt_truncated_and_missing_are_reported_and_leave_nothing(s3_server, faulty_bucket, tmp_path: Path) -> None:
    source, manifest = faulty_bucket
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url)
    report, downloaded = download_images(
        manifest, source, tmp_path, storage, max_missing_share=0.25, with_metadata=False
    )
    assert report.missing == ["missing"]
    assert set(report.corrupt) == {"corrupt", "truncated"}
    assert "does not decode" in report.corrupt["truncated"]
    assert len(downloaded) == 10
    assert sorted(p.name for p in (tmp_path / "bin-images").iterdir()) == sorted(f"{i}.jpg" for i in downloaded)

    with pytest.raises(
        DownloadError, match=r"1 missing, 0 unreadable and 2 corrupt of 13 images .*raise max_missing_share"
    ) as failure:
        download_images(manifest, source, tmp_path / "strict", storage, max_missing_share=0.1, with_metadata=False)
    assert "truncated" in str(failure.value) and "missing" in str(failure.value)


def test_transient_503s_are_retried(s3_server, abid_bucket: dict[str, int], tmp_path: Path) -> None:
    manifest = dict(list(abid_bucket.items())[:6])
    for image_id in list(manifest)[:3]:
        s3_server.fail_next(f"bin-images/{image_id}.jpg", times=2)
    before = s3_server.requests
    report, _ = download_images(
        manifest, BUCKET, tmp_path, Storage(s3_endpoint_url=s3_server.endpoint_url), concurrency=3
    )
    assert report.downloaded == 6 and not report.missing and not report.corrupt
    assert s3_server.requests - before == 6 * 2 + 3 * 2  # image + metadata each, plus two retries for three images


KILLABLE_DOWNLOAD = """
import sys
from pathlib import Path
from bincount.download import download_images
from bincount.manifest import read_manifest
from bincount.storage import Storage
storage = Storage(s3_endpoint_url=sys.argv[1])
manifest = read_manifest(storage, "s3://abid-sample/file_list.json")
download_images(manifest, "s3://abid-sample", Path(sys.argv[2]), storage, concurrency=2)
"""


def test_a_killed_download_resumes_without_refetching_or_partial_files(
    s3_server, abid_bucket: dict[str, int], tmp_path: Path
) -> None:
    s3_server.latency_s = 0.02
    try:
        child = subprocess.Popen([sys.executable, "-c", KILLABLE_DOWNLOAD, s3_server.endpoint_url, str(tmp_path)])
        ledger = Ledger(tmp_path).path
        wait_until(
            lambda: ledger.is_file() and len(ledger.read_text().splitlines()) >= 40,
            timeout_s=60,
            interval_s=0.05,
            what="40 images in the ledger",
        )
        child.kill()
        child.wait()
    finally:
        s3_server.latency_s = 0.0
    arrived = {path.stem for path in (tmp_path / "bin-images").glob("*.jpg")}
    assert 40 <= len(arrived) < len(abid_bucket), "the kill should land midway"

    storage = Storage(s3_endpoint_url=s3_server.endpoint_url)
    report, downloaded = download_images(abid_bucket, BUCKET, tmp_path, storage)
    assert report.already_present == len(arrived)
    assert report.downloaded == len(abid_bucket) - len(arrived)
    assert not list(tmp_path.glob("*/.tmp-*"))
    assert all(file_digest(image_path(tmp_path, i)) == entry.sha256 for i, entry in downloaded.items())


def _encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture
def hostile_bucket(s3_client) -> tuple[str, dict[str, int]]:
    """A public bucket of four good photos, one private object (403 to an anonymous reader), GIF,
    BMP and TIFF bytes saved as .jpg, and a 20-megapixel PNG of a few kilobytes (a bomb)."""
    s3_client.create_bucket(Bucket="hostile-objects")
    photo = render_bin_image(2, np.random.default_rng(0), size=48)
    bodies = {f"good{i}": jpeg_bytes(render_bin_image(i + 1, np.random.default_rng(i), size=48)) for i in range(4)}
    bodies |= {kind: _encoded(photo, kind.upper()) for kind in ("gif", "bmp", "tiff")}
    bodies["bomb"] = _encoded(Image.new("1", (5000, 4000)), "PNG")
    for image_id, body in bodies.items():
        s3_client.put_object(Bucket="hostile-objects", Key=f"bin-images/{image_id}.jpg", Body=body, ACL="public-read")
    s3_client.put_object(Bucket="hostile-objects", Key="bin-images/forbidden.jpg", Body=bodies["good0"])  # private
    return "s3://hostile-objects", dict.fromkeys([*bodies, "forbidden"], 1)


def test_forbidden_bombs_and_other_formats_are_listed_never_fatal_alone(
    s3_server, hostile_bucket, tmp_path: Path
) -> None:
    source, manifest = hostile_bucket
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url, anonymous=True)
    report, downloaded = download_images(
        manifest, source, tmp_path, storage, max_missing_share=0.7, with_metadata=False
    )
    assert sorted(downloaded) == ["good0", "good1", "good2", "good3"]
    assert list(report.unreadable) == ["forbidden"] and "access denied" in report.unreadable["forbidden"]
    assert sorted(report.corrupt) == ["bmp", "bomb", "gif", "tiff"]
    assert all("not a JPEG or PNG" in report.corrupt[kind] for kind in ("bmp", "gif", "tiff"))
    assert "5000x4000" in report.corrupt["bomb"]
    assert sorted(p.stem for p in (tmp_path / "bin-images").iterdir()) == sorted(downloaded)

    with pytest.raises(
        DownloadError, match=r"0 missing, 1 unreadable and 4 corrupt of 9 images .*forbidden: access denied"
    ):
        download_images(manifest, source, tmp_path / "strict", storage, max_missing_share=0.5, with_metadata=False)


def test_ids_that_leave_the_folder_are_refused_before_any_request(s3_server, hostile_bucket, tmp_path: Path) -> None:
    source, _ = hostile_bucket
    before = s3_server.requests
    with pytest.raises(UnsafeNameError, match=r"'\.\./\.\./evil' is not an image id"):
        download_images(
            {"good0": 1, "../../evil": 1}, source, tmp_path / "data", Storage(s3_endpoint_url=s3_server.endpoint_url)
        )
    assert s3_server.requests == before
    assert not list(tmp_path.rglob("evil*"))


def test_a_second_run_on_the_same_folder_waits_then_names_the_holder(s3_server, hostile_bucket, tmp_path: Path) -> None:
    source, _ = hostile_bucket
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url)
    in_flight = tmp_path / "bin-images" / ".tmp-good1.jpg.abc"  # what the holder is writing right now
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"partial")
    with file_lock(tmp_path / LOCK_NAME):
        started = time.monotonic()
        with pytest.raises(LockedError, match=rf"in use by pid {os.getpid()} on .* since "):
            download_images({"good0": 1}, source, tmp_path, storage, with_metadata=False, lock_wait_s=0.5)
        assert time.monotonic() - started >= 0.5
        assert in_flight.is_file(), "the waiting run must not touch the holder's files"
    report, _ = download_images({"good0": 1}, source, tmp_path, storage, with_metadata=False, lock_wait_s=0)
    assert report.downloaded == 1
    assert not in_flight.exists(), "once the lock is free, a killed run's leftovers are cleared"


CAP = 32 * 1024


@pytest.fixture(params=["s3", "file"])
def oversized_source(request, s3_client, tmp_path: Path) -> str:
    """Four good photos and, under a .jpg key, an object over a small cap (standing for a 5 GB one)."""
    bodies = {f"good{i}": jpeg_bytes(render_bin_image(i + 1, np.random.default_rng(i), size=48)) for i in range(4)}
    bodies["huge"] = np.random.default_rng(9).bytes(4 * CAP)
    assert max(len(body) for name, body in bodies.items() if name != "huge") < CAP
    if request.param == "file":
        for image_id, body in bodies.items():
            (tmp_path / "source" / "bin-images").mkdir(parents=True, exist_ok=True)
            (tmp_path / "source" / "bin-images" / f"{image_id}.jpg").write_bytes(body)
        return (tmp_path / "source").as_uri()
    s3_client.create_bucket(Bucket="oversized-objects")
    for image_id, body in bodies.items():
        s3_client.put_object(Bucket="oversized-objects", Key=f"bin-images/{image_id}.jpg", Body=body)
    return "s3://oversized-objects"


def test_an_object_over_the_cap_is_listed_by_key_and_the_rest_arrives(
    s3_server, oversized_source: str, tmp_path: Path
) -> None:
    storage = Storage(s3_endpoint_url=s3_server.endpoint_url)
    manifest = {"good0": 1, "good1": 2, "huge": 3, "good2": 3, "good3": 4}
    local = tmp_path / "mirror"
    report, downloaded = download_images(
        manifest, oversized_source, local, storage, max_missing_share=0.25, with_metadata=False, max_object_bytes=CAP
    )
    assert sorted(downloaded) == ["good0", "good1", "good2", "good3"] and report.downloaded == 4
    why = report.unreadable["huge"]
    assert f"{oversized_source}/bin-images/huge.jpg is {4 * CAP} bytes, over the cap of {CAP} bytes" in why
    assert "raise max_object_bytes" in why
    assert sorted(p.stem for p in (local / "bin-images").iterdir()) == sorted(downloaded), "nothing partial"
    assert set(Ledger(local).read()) == set(downloaded), "what arrived is kept"

    with pytest.raises(DownloadError, match=r"1 unreadable .*huge: .*over the cap of 32768 bytes"):
        download_images(manifest, oversized_source, local, storage, with_metadata=False, max_object_bytes=CAP)
    again, _ = download_images(manifest, oversized_source, local, storage, max_missing_share=0.25, with_metadata=False)
    assert (again.already_present, again.downloaded) == (4, 0) and MAX_OBJECT_BYTES > 4 * CAP
    assert check_image((local / "bin-images" / "good0.jpg").read_bytes())


def test_a_body_that_streams_past_the_cap_is_dropped_there() -> None:
    """A body larger than its stated size (or with none): reading stops one chunk past the cap."""
    pulled = []

    def body():
        for n in range(1000):  # 1000 chunks of 1 KiB: far more than any stated size
            pulled.append(n)
            yield bytes(1024)

    with pytest.raises(ObjectTooLargeError, match=r"s3://b/bin-images/x.jpg streamed more than the cap of 4096 bytes"):
        read_capped(body(), "s3://b/bin-images/x.jpg", 4096)
    assert len(pulled) == 5, "at most one chunk beyond the cap is held"
    assert read_capped(iter([b"ab", b"cd"]), "s3://b/k", 4) == b"abcd"


def test_bounded_map_reads_its_items_no_further_than_the_limit_ahead() -> None:
    """10,000 items through 4 threads, limit 8: never more than 8 taken but unfinished, every result once."""
    taken = finished = most_ahead = 0
    lock = threading.Lock()

    def items() -> Iterator[int]:
        nonlocal taken, most_ahead
        for item in range(10_000):
            with lock:
                taken += 1
                most_ahead = max(most_ahead, taken - finished)
            yield item

    def square(item: int) -> int:
        nonlocal finished
        with lock:
            finished += 1
        return item * item

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = {item: future.result() for item, future in bounded_map(pool, square, items(), limit=8)}
    assert results == {item: item * item for item in range(10_000)}
    assert most_ahead <= 8, f"{most_ahead} items taken ahead of the results"
