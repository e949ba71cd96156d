"""Cold and warm (cached) wall time of the whole pipeline on the demo data, in one run.

Cold: a new artifact root and data folder, nothing cached (``refresh=True``). Warm: the same
inputs again, served from cache up to the deploy (which is never cached). The warm/cold ratio is
what caching saves.

    .venv/bin/python benchmarks/pipeline_wall_time.py --images 300
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="demo photos (default: 300)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        os.environ["BINCOUNT_DATA_DIR"] = str(Path(root) / "raw")
        from bincount.config import Settings
        from bincount.demo_data import generate_demo_bucket
        from bincount.serving.backend import get_serving_backend
        from bincount.storage import Storage
        from flows.cli import demo_training_options
        from flows.data import DataOptions
        from flows.pipeline import pipeline

        bucket = (Path(root) / "bucket").as_uri()
        generate_demo_bucket(Storage(), bucket, images=args.images, seed=0)
        where = {"source_uri": bucket, "artifact_root": str(Path(root) / "artifacts"), "endpoint_name": "bench"}
        try:
            started = time.perf_counter()
            pipeline(DataOptions(), demo_training_options(), refresh=True, **where)
            cold = time.perf_counter() - started
            started = time.perf_counter()
            pipeline(DataOptions(), demo_training_options(), **where)
            warm = time.perf_counter() - started
        finally:
            get_serving_backend(Settings.load(artifact_root=where["artifact_root"])).delete("bench")
    print(
        f"pipeline on {args.images} demo photos: cold {cold:.1f} s, warm (cached) {warm:.1f} s, "
        f"warm/cold {warm / cold:.2f}"
    )


if __name__ == "__main__":
    main()
