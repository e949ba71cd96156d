"""Download throughput: the download task's engine against the seeds' serial boto3 loop.

Both read the same objects from one S3 API on loopback (moto, in its own process) that adds
``--latency-ms`` to every request to stand for S3's round trip. Peak memory is measured in fresh
processes at growing object counts to show it stays flat.

    .venv/bin/python benchmarks/download_throughput.py --objects 1000 --latency-ms 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3

from bincount.demo_data import jpeg_bytes, render_bin_image

ROOT = Path(__file__).resolve().parents[1]
ABID_IMAGES = ROOT.parent / "shared" / "data" / "abid" / "bucket" / "bin-images"
BUCKET = "bench-download"


def start_server(port: int, latency_ms: float) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "bincount.loopback_s3", "--port", str(port), "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    server.stdout.readline()  # "S3 API at ..." once it listens
    return server


def seed_bucket(client, objects: int) -> list[str]:
    """Upload ``objects`` images (real ABID photos when the sample is there, demo photos otherwise)."""
    import numpy as np

    client.create_bucket(Bucket=BUCKET)
    real = sorted(ABID_IMAGES.glob("*.jpg"))[:objects] if ABID_IMAGES.is_dir() else []
    rng = np.random.default_rng(0)
    ids = [f"{n:05d}" for n in range(1, objects + 1)]

    def put(index: int) -> None:
        body = real[index].read_bytes() if index < len(real) else jpeg_bytes(render_bin_image(index % 5 + 1, rng))
        client.put_object(Bucket=BUCKET, Key=f"bin-images/{ids[index]}.jpg", Body=body)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(objects)))
    print(f"seeded {objects} objects ({len(real)} real ABID photos)")
    return ids


def serial_loop(client, ids: list[str], target: Path) -> float:
    """The seeds' way: one boto3 download_file after another."""
    started = time.perf_counter()
    for image_id in ids:
        client.download_file(BUCKET, f"bin-images/{image_id}.jpg", str(target / f"{image_id}.jpg"))
    return time.perf_counter() - started


CHILD = """
import json, resource, sys, time
from pathlib import Path
from bincount.download import download_images
from bincount.storage import Storage
endpoint, target, count, concurrency = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
manifest = {f"{n:05d}": 1 for n in range(1, count + 1)}
report, _ = download_images(manifest, "s3://bench-download", target, Storage(s3_endpoint_url=endpoint),
                            concurrency=concurrency, with_metadata=False)
assert report.downloaded == count, report
print(json.dumps({"seconds": report.seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def task_engine(endpoint: str, count: int, concurrency: int) -> dict:
    """bincount.download in a fresh process (so its peak RSS is its own)."""
    with tempfile.TemporaryDirectory() as target:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, endpoint, target, str(count), str(concurrency)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1000, help="objects to download (default: 1000)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="latency added per request (default: 20)")
    parser.add_argument("--concurrency", type=int, default=32, help="downloads in flight (default: 32)")
    parser.add_argument("--port", type=int, default=5077, help="port of the loopback S3 API (default: 5077)")
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    server = start_server(args.port, args.latency_ms)
    endpoint = f"http://127.0.0.1:{args.port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        ids = seed_bucket(client, args.objects)
        with tempfile.TemporaryDirectory() as target:
            serial_s = serial_loop(client, ids, Path(target))
        ours = task_engine(endpoint, args.objects, args.concurrency)
        print(f"serial boto3 download_file loop: {args.objects / serial_s:8.1f} objects/s ({serial_s:.1f} s)")
        print(
            f"bincount download_images:        {args.objects / ours['seconds']:8.1f} objects/s ({ours['seconds']:.1f} s, "
            f"concurrency {args.concurrency}, decode-checked and hashed)"
        )
        print(f"speed-up: {serial_s / ours['seconds']:.1f}x  (target >= 10x) at {args.latency_ms:g} ms per request")
        peaks = {
            n: task_engine(endpoint, n, args.concurrency)["peak_rss_mb"] for n in (args.objects // 4, args.objects // 2)
        }
        peaks[args.objects] = ours["peak_rss_mb"]
        print("peak RSS by object count: " + ", ".join(f"{n}: {mb:.0f} MB" for n, mb in sorted(peaks.items())))
        print(
            f"peak RSS ratio {max(peaks)} vs {min(peaks)} objects: {peaks[max(peaks)] / peaks[min(peaks)]:.2f}  (flat = 1.0)"
        )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
