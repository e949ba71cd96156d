"""The `bincount` command: run the pipeline on the offline demo data, prepare a real dataset,
make demo data, or stop an endpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bincount.config import Settings, to_uri
from bincount.demo_data import generate_demo_bucket
from bincount.storage import join_uri, storage_for


def demo_bucket(settings: Settings, images: int, seed: int) -> str:
    """The demo bucket under the artifact root, generated on first use; returns its URI."""
    bucket_uri = settings.artifact_uri("demo-bucket")
    storage = storage_for(settings)
    if not storage.exists(join_uri(bucket_uri, "file_list.json")):
        print(f"Generating {images} synthetic bin photos at {bucket_uri} (seed {seed})")
        generate_demo_bucket(storage, bucket_uri, images=images, seed=seed)
    return bucket_uri


def demo_training_options():
    """Small enough for a laptop CPU in a few minutes; the real defaults (ResNet-50 at 224 px, the
    seeds' search space) are for real data."""
    from flows.train import TrainOptions

    return TrainOptions(
        arch="resnet18",
        image_size=64,
        max_jobs=3,
        hyperparameters={"optimizer": "adamw", "lr-scheduler": "cosine"},
        search_space=[
            {"type": "continuous", "name": "lr", "low": 0.001, "high": 0.01, "scaling": "Logarithmic"},
            {"type": "categorical", "name": "batch-size", "values": [32, 64]},
            {"type": "integer", "name": "epochs", "low": 4, "high": 8},
        ],
    )


def main(argv: list[str] | None = None) -> None:
    # Without PREFECT_API_URL each run starts a temporary server: give it time on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = argparse.ArgumentParser(prog="bincount", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the whole pipeline offline on synthetic demo data")
    demo.add_argument("--images", type=int, default=600, help="demo photos to generate (default: 600)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the demo data (default: 0)")
    demo.add_argument("--refresh", action="store_true", help="ignore cached results (default: off)")
    data = commands.add_parser("data", help="prepare a dataset from a manifest (default source: the public ABID bucket)")
    data.add_argument("--manifest-uri", help="seed-format file_list.json: a path, file:// or s3:// URI")
    data.add_argument("--ids-file", type=Path, help="instead of a manifest: a file of image ids, one per line")
    data.add_argument("--source-uri", help="bucket laid out like ABID (default: BINCOUNT_SOURCE_URI or s3://aft-vbi-pds)")
    data.add_argument("--dataset", default="abid", help="dataset name under <artifact_root>/datasets (default: abid)")
    data.add_argument("--max-missing-share", type=float, default=0.01, help="missing/corrupt share tolerated (default: 0.01)")
    data.add_argument("--refresh", action="store_true", help="ignore cached results (default: off)")
    stop = commands.add_parser("delete-endpoint", help="stop a local endpoint and forget its record")
    stop.add_argument("name", help="endpoint name (the demo's is 'bincount')")
    make = commands.add_parser("make-demo-data", help="write a demo bucket at a URI and print its manifest URI")
    make.add_argument("uri", help="file:// or s3:// URI, or a folder")
    make.add_argument("--images", type=int, default=600, help="demo photos to generate (default: 600)")
    make.add_argument("--seed", type=int, default=0, help="seed of the demo data (default: 0)")
    args = parser.parse_args(argv)

    settings = Settings.load()
    if args.command == "make-demo-data":
        target = to_uri(args.uri)
        print(generate_demo_bucket(storage_for(settings), target, images=args.images, seed=args.seed))
        return
    if args.command == "delete-endpoint":
        from bincount.serving.backend import get_serving_backend

        get_serving_backend(settings).delete(args.name)
        print(f"Endpoint {args.name!r} stopped")
        return
    from flows.data import DataOptions, prepare_data

    if args.command == "data":
        options = DataOptions(
            manifest_uri=to_uri(args.manifest_uri) if args.manifest_uri else None,
            image_ids=args.ids_file.read_text().split() if args.ids_file else None,
            dataset=args.dataset,
            max_missing_share=args.max_missing_share,
        )
        result = prepare_data(options, source_uri=args.source_uri, refresh=args.refresh)
        print(f"Prepared {result.images} images; split manifest: {result.split_uri}")
        return
    from flows.pipeline import pipeline

    source_uri = demo_bucket(settings, args.images, args.seed)
    result = pipeline(DataOptions(), demo_training_options(), source_uri=source_uri, refresh=args.refresh)
    evaluation, endpoint, scored = result.evaluation, result.endpoint, result.batch_transform
    print(
        f"\nTest accuracy {evaluation['accuracy']:.3f}, RMSE {evaluation['rmse']:.3f} ({evaluation['images']} images)\n"
        f"Model: {result.model_uri}\n"
        f"Endpoint {endpoint['name']!r} serves it at {endpoint['url']}:\n"
        f"  boto3.client('sagemaker-runtime', endpoint_url='{endpoint['url']}', region_name='us-east-1',\n"
        f"               aws_access_key_id='local', aws_secret_access_key='local')  # any credentials do locally\n"
        f"       "
        f".invoke_endpoint(EndpointName='{endpoint['name']}', Body=jpeg_bytes, ContentType='image/jpeg')\n"
        f"Batch transform: {scored['images']} images scored into {scored['output_uri']}\n"
        f"Stop the endpoint with: bincount delete-endpoint {endpoint['name']}"
    )


if __name__ == "__main__":
    main()
