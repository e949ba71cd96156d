"""The `bincount` command: run the pipeline on the offline demo data, or make that data."""

from __future__ import annotations

import argparse

from bincount.config import Settings
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bincount", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the pipeline offline on synthetic demo data")
    demo.add_argument("--images", type=int, default=600, help="demo photos to generate (default: 600)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the demo data (default: 0)")
    demo.add_argument("--refresh", action="store_true", help="ignore cached results (default: off)")
    make = commands.add_parser("make-demo-data", help="write a demo bucket at a URI and print its manifest URI")
    make.add_argument("uri", help="file:// or s3:// URI, or a folder")
    make.add_argument("--images", type=int, default=600, help="demo photos to generate (default: 600)")
    make.add_argument("--seed", type=int, default=0, help="seed of the demo data (default: 0)")
    args = parser.parse_args(argv)

    settings = Settings.load()
    if args.command == "make-demo-data":
        target = Settings.load(artifact_root=args.uri).artifact_root
        print(generate_demo_bucket(storage_for(settings), target, images=args.images, seed=args.seed))
        return
    from flows.data import prepare_data

    source_uri = demo_bucket(settings, args.images, args.seed)
    result = prepare_data(source_uri=source_uri, refresh=args.refresh)
    print(f"Prepared {result.images} images; channels: {result.channels}")


if __name__ == "__main__":
    main()
