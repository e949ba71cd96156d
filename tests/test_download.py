"""The download stage against a real S3 API on loopback: real ABID images, bad objects, 503s, kills."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from bincount.download import DownloadError, Ledger, check_image, download_images, image_path
from bincount.storage import Storage, file_digest

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
        DownloadError, match=r"1 missing and 2 corrupt of 13 images .*raise max_missing_share"
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
        deadline = time.monotonic() + 60
        while not (ledger.is_file() and len(ledger.read_text().splitlines()) >= 40) and time.monotonic() < deadline:
            time.sleep(0.05)
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
