"""How often the nightly's promotion rule promotes, old against new, on the real ABID sample.

Trains a few cheap models on one stratified split of ``../shared/data/abid`` (train 60%, valid 5%, the rest
held out): ``--seeds`` models of one recipe (the pipeline's default recipe, cut down: EfficientNet-Lite0 at
``--image-size`` for ``--epochs``), and one clearly weaker model (a head on a random, frozen ResNet-18). Each model
scores the pooled held-out images once; then, for ``--draws`` random test sides of each of ``--sizes`` images
drawn from that pool, both rules decide on every ordered (champion, challenger) pair:

    old   challenger accuracy >= champion accuracy + margin
    new   bincount.stats.compare_paired(truth, champion, challenger, margin=margin).verdict == "better"

Same-recipe pairs have no true difference by recipe: a promotion there is a false one (a coin toss reported as
"beats"). Strong-over-weak pairs measure power; weak-over-strong pairs, promotions of a worse model.

    nice -n 10 .venv/bin/python benchmarks/promotion_rule.py > /tmp/promotion-rule.log 2>&1 &

Models and their predictions are kept under ``--work-dir``: a second run with the same settings only redraws.
"""

from __future__ import annotations

import json
import sys
import time
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_quality import RECIPE, cpu_seconds, sample_arguments, train, write_channels
from bincount.config import Settings
from bincount.evaluation import predict_counts
from bincount.manifest import parse_manifest
from bincount.models import fetch_model
from bincount.stats import compare_paired, scores
from bincount.storage import Storage, storage_for
from sm_scripts.data import load_channel
from sm_scripts.model_dir import read_model_info

# A head trained on a random, frozen ResNet-18: clearly weaker. (ResNet-18 trained from scratch for an epoch is not,
# at this size: on the pool it scored 0.321 against the recipe's 0.305.)
WEAK = {"arch": "resnet18", "weights": "none", "freeze-backbone": "true", "augment": "none", "epochs": 1}


def held_out_split(manifest: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Train 60%, valid 5%, held-out pool 35%, each stratified by count."""
    ids, labels = list(manifest), list(manifest.values())
    train, rest, _, rest_labels = train_test_split(ids, labels, train_size=0.6, stratify=labels, random_state=seed)
    valid, pool = train_test_split(rest, train_size=0.125, stratify=rest_labels, random_state=seed)
    return {"train": train, "valid": valid, "test": pool}


def pool_predictions(storage: Storage, model_uri: str, pool_dir: Path, scratch: Path) -> tuple[list[int], list[int]]:
    """The true and predicted counts of every held-out image, in the channel's file order."""
    model_dir, _ = fetch_model(storage, model_uri, scratch)
    info = read_model_info(model_dir)
    cache = load_channel(pool_dir, [str(c) for c in info["classes"]], info["image_size"], torch.get_num_threads())
    truth = [info["classes"][i] for i in cache.labels.tolist()]
    return truth, predict_counts(model_dir, cache)


def train_and_score(
    name: str, hyperparameters: dict[str, Any], channels: dict[str, Path], work_dir: Path, settings: Settings
) -> dict[str, Any]:
    """Train one model (or reuse the one a previous run of these settings left) and score the held-out pool."""
    kept = work_dir / "models" / f"{name}.json"
    if kept.is_file() and json.loads(kept.read_text())["hyperparameters"] == hyperparameters:
        print(f"{name}: reusing {kept}", flush=True)
        return json.loads(kept.read_text())
    cpu, wall = cpu_seconds(), time.monotonic()
    job_name = f"bincount-promotion-{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    job = train(settings, job_name, hyperparameters, channels, prefix=f"[{name}] ")
    truth, predicted = pool_predictions(storage_for(settings), job.model_uri, channels["test"], work_dir / "fetched")
    record = {
        "name": name,
        "hyperparameters": hyperparameters,
        "model_uri": job.model_uri,
        "truth": truth,
        "predicted": predicted,
        "cpu_minutes": (cpu_seconds() - cpu) / 60,
        "wall_minutes": (time.monotonic() - wall) / 60,
    }
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(record))
    print(f"{name}: pool accuracy {scores(truth, predicted).accuracy:.3f}, {record['cpu_minutes']:.1f} CPU min")
    return record


def promotion_rates(
    truth: np.ndarray,
    predictions: dict[str, np.ndarray],
    pairs: list[tuple[str, str]],
    size: int,
    draws: int,
    margin: float,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Shares of (draw, pair) decisions the old and the new rule promote, on ``draws`` test sides of ``size``."""
    old = new = 0
    for _ in range(draws):
        side = rng.choice(len(truth), size=size, replace=False)
        for champion, challenger in pairs:
            y, a, b = truth[side], predictions[champion][side], predictions[challenger][side]
            old += bool(np.mean(b == y) >= np.mean(a == y) + margin)
            new += compare_paired(y, a, b, margin=margin).verdict == "better"
    return old / (draws * len(pairs)), new / (draws * len(pairs))


def main() -> None:
    parser = sample_arguments(__doc__.splitlines()[0], "promotion")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="same-recipe models (default: 0 1 2)")
    parser.add_argument("--arch", default="efficientnet_lite0", help="the recipe's arch (default: efficientnet_lite0)")
    parser.add_argument("--image-size", type=int, default=64, help="the recipe's image size (default: 64)")
    parser.add_argument("--epochs", type=int, default=1, help="the recipe's epochs (default: 1)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[65, 460], help="test-side sizes (default: 65 460)")
    parser.add_argument("--draws", type=int, default=200, help="test sides drawn per size (default: 200)")
    parser.add_argument("--margin", type=float, default=0.01, help="the nightly's margin, both rules (default: 0.01)")
    args = parser.parse_args()
    if not (args.data_dir / args.manifest).is_file():
        sys.exit(f"the real ABID sample is not at {args.data_dir}: pass --data-dir")

    manifest = parse_manifest((args.data_dir / args.manifest).read_bytes(), args.manifest)
    channels = write_channels(args.data_dir, manifest, held_out_split(manifest, 0), args.work_dir / "split")
    settings = Settings.load(artifact_root=str(args.work_dir / "artifacts"))
    recipe = {**RECIPE, "arch": args.arch, "weights": "imagenet", "image-size": args.image_size, "epochs": args.epochs}
    recipe["log-interval"] = 25
    models = [
        train_and_score(f"strong-{seed}", {**recipe, "seed": seed}, channels, args.work_dir, settings)
        for seed in args.seeds
    ]
    models.append(train_and_score("weak", {**recipe, **WEAK, "seed": 0}, channels, args.work_dir, settings))

    truth = np.asarray(models[0]["truth"])
    predictions = {model["name"]: np.asarray(model["predicted"]) for model in models}
    strong = [f"strong-{seed}" for seed in args.seeds]
    print(f"\nheld-out pool: {len(truth)} images; training {sum(m['cpu_minutes'] for m in models):.0f} CPU min")
    for name, predicted in predictions.items():
        print(f"  {name}: accuracy {scores(truth, predicted).accuracy:.3f} on the whole pool")
    for champion, challenger in permutations(strong, 2):
        whole = compare_paired(truth, predictions[champion], predictions[challenger])
        print(f"  {challenger} against {champion} on the whole pool: {whole.sentence}")
    cases = {
        "same recipe, other seed (false promotions)": list(permutations(strong, 2)),
        "strong challenger, weak champion (power)": [("weak", name) for name in strong],
        "weak challenger, strong champion (worse promoted)": [(name, "weak") for name in strong],
    }
    rng = np.random.default_rng(0)
    rows = [
        "| pairs | test images | decisions | old rule promotes | new rule promotes |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, pairs in cases.items():
        for size in args.sizes:
            old, new = promotion_rates(truth, predictions, pairs, size, args.draws, args.margin, rng)
            rows.append(f"| {label} | {size} | {args.draws * len(pairs)} | {100 * old:.1f}% | {100 * new:.1f}% |")
            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))
    print("command: nice -n 10 .venv/bin/python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
