"""The int8 parity verdicts of one recipe over seeds, under the old rule and the new one, on the real ABID sample.

For each seed: the split ``train_quality.py --seeds`` makes (80/10/10, stratified, the seed also seeds the
training), the default recipe trained on it (flags after ``--`` override it, as in ``train_quality.py``), and the
optimize stage itself (``bincount.optimize.optimize_model``: calibrated on train, accuracy control on valid, parity
on the 460 test images). Each model's int8 is judged by both rules on the same test images:

    old   int8 passes when its accuracy is at most 0.5 points below eager's
    new   bincount.optimize.ParityRule: not worse than eager by a one-sided exact McNemar test on the images only
          one of them gets right, its drop under a hard ceiling, top-1 agreement above a floor

    nice -n 10 .venv/bin/python benchmarks/int8_parity.py --seeds 0 1 2 3 4 > /tmp/int8-parity.log 2>&1 &
    nice -n 10 .venv/bin/python benchmarks/int8_parity.py -- --epochs 1 --image-size 112   # a cut-down recipe

Each seed's figures are kept under ``--work-dir`` as they come: a second run with the same settings reuses them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_quality import RECIPE, cpu_seconds, sample_arguments, seed_splits, train, write_channels
from bincount.config import Settings
from bincount.manifest import parse_manifest
from bincount.optimize import CALIBRATION_IMAGES, ParityRule, optimize_model
from bincount.storage import storage_for
from flows.train import TrainOptions

OLD_MAX_DROP = 0.005  # the old rule: int8 test accuracy at most 0.5 points below eager's


def judge_seed(
    name: str,
    hyperparameters: dict[str, Any],
    channels: dict[str, Path],
    work_dir: Path,
    settings: Settings,
    calibration_images: int,
) -> dict[str, Any]:
    """Train one seed's model and run the optimize stage on it (or reuse what a run of these settings left)."""
    kept = work_dir / "seeds" / f"{name}.json"
    if kept.is_file() and json.loads(kept.read_text())["hyperparameters"] == hyperparameters:
        print(f"{name}: reusing {kept}", flush=True)
        return json.loads(kept.read_text())
    cpu, wall = cpu_seconds(), time.monotonic()
    job = train(settings, f"bincount-int8-parity-{time.strftime('%Y%m%d-%H%M%S')}-{name}", hyperparameters, channels)
    assert job.model_uri is not None  # a completed job has its model
    train_cpu = (cpu_seconds() - cpu) / 60
    stage = optimize_model(
        storage_for(settings),
        job.model_uri,
        channels["train"].as_uri(),
        channels["valid"].as_uri(),
        channels["test"].as_uri(),
        (work_dir / "optimized" / f"{name}.tar.gz").as_uri(),
        calibration_images=calibration_images,
    )
    if stage.eager_accuracy is None or stage.optimized_accuracy is None:
        raise SystemExit(f"{name}: the optimize stage measured nothing: {stage.reason}")
    drop = stage.eager_accuracy - stage.optimized_accuracy
    record = {
        "name": name,
        "hyperparameters": hyperparameters,
        "model_uri": job.model_uri,
        **{key: value for key, value in stage.to_dict().items() if key != "model_uri"},
        "old_rule_passes": drop <= OLD_MAX_DROP + 1e-9,
        "new_rule_passes": stage.optimized,
        "train_cpu_minutes": train_cpu,
        "cpu_minutes": (cpu_seconds() - cpu) / 60,
        "wall_minutes": (time.monotonic() - wall) / 60,
    }
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(record, indent=1))
    print(f"{name}: {stage.reason}; {record['cpu_minutes']:.1f} CPU min", flush=True)
    return record


def table_row(record: dict[str, Any]) -> str:
    eager, int8 = record["eager_accuracy"], record["optimized_accuracy"]
    return (
        f"| {record['name']} | {100 * eager:.2f}% | {100 * int8:.2f}% | {100 * (int8 - eager):+.2f} | "
        f"{record['only_eager_right']} / {record['only_optimized_right']} | {record['p_value']:.3f} | "
        f"{100 * record['top1_agreement']:.1f}% | {'passes' if record['old_rule_passes'] else 'fails'} | "
        f"{'passes' if record['new_rule_passes'] else 'fails'} |"
    )


def main() -> None:
    parser = sample_arguments(__doc__.splitlines()[0], "int8-parity")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="(default: 0 1 2 3 4)")
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, help="(default: %(default)s)")
    parser.add_argument("train_flags", nargs="*", help="train.py flags overriding the default recipe, after --")
    args = parser.parse_args()
    if not (args.data_dir / args.manifest).is_file():
        sys.exit(f"the real ABID sample is not at {args.data_dir}: pass --data-dir")

    manifest = parse_manifest((args.data_dir / args.manifest).read_bytes(), args.manifest)
    settings = Settings.load(artifact_root=str(args.work_dir / "artifacts"))
    overrides = {name.removeprefix("--"): value for name, value in zip(*[iter(args.train_flags)] * 2, strict=True)}
    recipe = {"arch": TrainOptions().arch, "weights": "imagenet", **RECIPE, **overrides}
    records = []
    for label, seed, split in seed_splits(list(manifest), list(manifest.values()), args.seeds):
        channels = write_channels(args.data_dir, manifest, split, args.work_dir / label)
        records.append(
            judge_seed(label, {**recipe, "seed": seed}, channels, args.work_dir, settings, args.calibration_images)
        )

    rule = ParityRule()
    print(
        f"\nrecipe: {json.dumps(recipe)}\nnew rule: one-sided exact McNemar at alpha {rule.alpha}, ceiling "
        f"{100 * rule.max_drop:.1f} points, agreement floor {100 * rule.min_agreement:.0f}%; old rule: drop at most "
        f"{100 * OLD_MAX_DROP:.1f} points"
    )
    rows = [
        "| seed | eager | int8 | int8 - eager (points) | only eager / only int8 right | McNemar p | agreement "
        "| old rule | new rule |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
        *map(table_row, records),
    ]
    print("\n".join(rows))
    print(f"CPU minutes a seed: {sum(r['cpu_minutes'] for r in records) / len(records):.1f}")
    print("command: nice -n 10 .venv/bin/python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
