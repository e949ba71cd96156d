"""Learning curve of the feedback loop on the real ABID sample: accuracy on shifted test photos against the number
of labelled shifted photos harvested from production.

    pipeline on the old photos (serving, capture at 100%) ─► score it on the test side made darker and recompressed
    ─► per N: send shifted training-side photos to the endpoint with their InferenceId and their truth
       ─► harvest-feedback ─► nightly-retrain (the latest manifest version; promote or keep by the paired test)
       ─► score the challenger and what serves on the shifted (and the original) test photos

The shifted test photos are the test side of the first split, made darker (``--brightness``) and recompressed
(``--quality``): no harvested photo shows one of their bins. The harvested ones are the training side's, shifted
the same way, sent in a fixed shuffled order (N is cumulative). Every retrain starts from ImageNet weights with the
serving version's recipe, on the original manifest plus the harvested photos.

A cut-down recipe, chosen to fit the whole run in about 40 minutes on a quiet 2-core CPU: EfficientNet-Lite0 at
``--image-size`` px, ``--epochs`` epochs, one tuning trial, no debugger, profiler or int8 step. Its accuracy is
below the pipeline's default recipe's; the curve's shape is the point.

    nice -n 10 .venv/bin/python benchmarks/learning_curve.py            # N = 100, 300, 1000
    .venv/bin/python benchmarks/learning_curve.py --steps 50 --image-size 64 --epochs 1   # a quick look

Prints one ``ROW`` per step as it ends and the table at the end; all of it lands in ``<work-dir>/curve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bincount.config import Location, Settings
from bincount.demo_data import shift_photo
from bincount.endpoints import EndpointRecords
from bincount.evaluation import evaluate_model
from bincount.factory import get_model_registry
from bincount.split import read_split
from bincount.storage import Storage
from flows.data import DataOptions
from flows.drift_demo import Request, send_traffic, write_labels
from flows.endpoints import delete_endpoint
from flows.harvest import harvest_feedback
from flows.nightly import nightly_retrain
from flows.pipeline import pipeline
from flows.train import BEST_HYPERPARAMETERS, TrainOptions

ENDPOINT = "curve"


def channel(folder: Path, photos: dict[str, tuple[int, bytes]]) -> str:
    """A test channel ``<folder>/<count>/<id>.jpg``; returns its URI."""
    for image_id, (count, data) in photos.items():
        path = folder / str(count) / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder.as_uri()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "abid")
    parser.add_argument("--manifest", default="file_list.sample.json")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/learning-curve"))
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300, 1000], help="harvested photos, cumulative")
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--brightness", type=float, default=0.4, help="the shift: this times as bright")
    parser.add_argument("--quality", type=int, default=25, help="the shift: recompressed at this JPEG quality")
    args = parser.parse_args()

    started = time.monotonic()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    bucket = args.data_dir / "bucket"
    settings = Settings.load(artifact_root=str(work / "artifacts"), source_uri=str(bucket), data_dir=str(work / "data"))
    location = Location.of(settings)
    storage = Storage()
    training = TrainOptions(
        arch=args.arch,
        image_size=args.image_size,
        max_jobs=1,
        debugger=False,
        profiler=False,
        hyperparameters=dict(BEST_HYPERPARAMETERS),
        search_space=[
            {"type": "categorical", "name": "lr", "values": [0.001]},
            {"type": "categorical", "name": "batch-size", "values": [32]},
            {"type": "categorical", "name": "epochs", "values": [args.epochs]},
        ],
    )
    data = DataOptions(manifest_uri=str(args.data_dir / args.manifest))
    print(f"Recipe: {args.arch} at {args.image_size} px, {args.epochs} epochs, one trial, no int8 (cut down)")
    served = pipeline(
        data, training, endpoint_name=ENDPOINT, location=location, data_capture_percentage=100, optimize=False
    )
    split = read_split(storage, served.dataset_split_uri)
    sides = {side: split[split["split"] == side] for side in ("train", "test")}

    def original(image_id: str) -> bytes:
        return (bucket / "bin-images" / f"{image_id}.jpg").read_bytes()

    test = dict(zip(sides["test"]["id"], sides["test"]["label"].astype(int), strict=True))
    shifted_test = channel(
        work / "shifted-test",
        {i: (c, shift_photo(original(i), args.brightness, args.quality)) for i, c in test.items()},
    )
    original_test = channel(work / "original-test", {i: (c, original(i)) for i, c in test.items()})
    pool = sorted(zip(sides["train"]["id"], sides["train"]["label"].astype(int), strict=True))
    random.Random(0).shuffle(pool)
    steps = sorted(step for step in args.steps if step > 0)
    if steps and steps[-1] > len(pool):
        print(f"The training side holds {len(pool)} photos: the last step harvests {len(pool)}, not {steps[-1]}")
        steps = [min(step, len(pool)) for step in steps]

    registry = get_model_registry(settings)

    def score(model_uri: str) -> tuple[float, float]:
        return (
            evaluate_model(storage, model_uri, shifted_test).accuracy,
            evaluate_model(storage, model_uri, original_test).accuracy,
        )

    first_shifted, first_original = score(served.model_uri)
    rows = [
        {
            "harvested": 0,
            "challenger": served.model_version,
            "challenger_shifted": first_shifted,
            "challenger_original": first_original,
            "decision": "first version",
            "serving": served.model_version,
            "serving_shifted": first_shifted,
            "minutes": round((time.monotonic() - started) / 60, 1),
        }
    ]
    print(f"ROW {json.dumps(rows[-1])}", flush=True)
    labels_uri = (work / "labels").as_uri()
    sent = 0
    for step in steps:
        batch = [
            Request(f"shift-{image_id}", shift_photo(original(image_id), args.brightness, args.quality), count, True)
            for image_id, count in pool[sent:step]
        ]
        write_labels(storage, labels_uri, batch)
        record = EndpointRecords(settings, storage).read(ENDPOINT)
        assert record is not None, "the endpoint's record is gone"
        send_traffic(record, batch)
        sent = step
        version = harvest_feedback(ENDPOINT, labels_uri=labels_uri, budget=0, location=location)
        result = nightly_retrain(ENDPOINT, location=location, optimize=False)
        decision = result.decision
        challenger = registry.get(ENDPOINT, decision.challenger_version) if decision.challenger_version else None
        serving = registry.production(ENDPOINT)
        challenger_scores = score(challenger.model_uri) if challenger else (None, None)
        rows.append(
            {
                "harvested": step,
                "manifest_images": version.images if version else None,
                "challenger": str(challenger.ref) if challenger else "-",
                "challenger_shifted": challenger_scores[0],
                "challenger_original": challenger_scores[1],
                "decision": decision.outcome or ("promoted" if decision.promoted else "kept"),
                "reason": decision.reason,
                "serving": str(serving.ref) if serving else "-",
                "serving_shifted": score(serving.model_uri)[0] if serving else None,
                "minutes": round((time.monotonic() - started) / 60, 1),
            }
        )
        print(f"ROW {json.dumps(rows[-1])}", flush=True)
    delete_endpoint(ENDPOINT, location=location)
    (work / "curve.json").write_text(
        json.dumps(
            {"args": vars(args) | {"data_dir": str(args.data_dir), "work_dir": str(work)}, "rows": rows}, indent=1
        )
    )
    print(
        f"\nShifted test photos: {len(test)} (brightness x{args.brightness}, JPEG quality {args.quality}); "
        f"{os.cpu_count()} CPUs; {rows[-1]['minutes']} min in all"
    )
    print("| harvested | challenger: shifted test acc | original test acc | nightly | serving: shifted test acc |")
    print("|---|---|---|---|---|")
    for row in rows:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(
            f"| {row['harvested']} | {fmt(row['challenger_shifted'])} | {fmt(row['challenger_original'])} | "
            f"{row['decision']} | {fmt(row['serving_shifted'])} ({row['serving']}) |"
        )


if __name__ == "__main__":
    main()
