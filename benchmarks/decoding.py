"""The models a ``train_quality.py`` run trained, scored again on their own test sides with each decoding
(``mode``: the most probable count; ``median``: where the cumulative probability reaches 1/2), so that
the decodings are compared on the same weights:

    .venv/bin/python benchmarks/train_quality.py --work-dir .bincount/q-lite1 --seeds 0 1 2 -- ...
    .venv/bin/python benchmarks/decoding.py .bincount/q-lite1

(The epoch each run kept was chosen on valid with the decoding it trained with.) ``--tta`` scores each
decoding again with the softmax averaged over the views the model trained on (train_quality's ``--tta``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_quality import FIGURES, evaluate_on_counts
from bincount.storage import Storage
from sm_scripts.networks import DECODINGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dirs", type=Path, nargs="+", help="train_quality.py --work-dir folders")
    parser.add_argument("--tta", action="store_true", help="also score each decoding with test-time augmentation")
    args = parser.parse_args()
    for work_dir in args.work_dirs:
        jobs = sorted((work_dir / "artifacts" / "jobs").glob("*/output/model.tar.gz"))
        if not jobs:
            sys.exit(f"{work_dir} holds no trained models (artifacts/jobs/*/output/model.tar.gz)")
        scorings = [f"{decoding}{tta}" for decoding in DECODINGS for tta in ("", " TTA")[: 1 + args.tta]]
        scores: dict[str, list[dict[str, float]]] = {scoring: [] for scoring in scorings}
        for archive in jobs:
            split = archive.parents[1].name.split("-", 5)[-1]  # bincount-train-quality-<date>-<time>-<split>
            test_dir = work_dir / split / "channels" / "test"
            counts = sorted(int(p.name) for p in test_dir.iterdir() if p.is_dir())
            for scoring in scorings:
                decoding, tta = scoring.removesuffix(" TTA"), scoring.endswith(" TTA")
                evaluation = evaluate_on_counts(Storage(), archive.as_uri(), test_dir, counts, tta, decoding)
                scores[scoring].append(evaluation.to_dict())
                figures = ", ".join(f"{name} {scores[scoring][-1][name]:.4f}" for name in FIGURES)
                print(f"{work_dir.name} {split} {scoring}: {figures}", flush=True)
        for scoring, runs in scores.items():
            summary = ", ".join(
                f"{name} {statistics.mean(r[name] for r in runs):.4f} +- "
                f"{statistics.stdev(r[name] for r in runs) if len(runs) > 1 else 0.0:.4f}"
                for name in FIGURES
            )
            print(f"SUMMARY {work_dir.name} {scoring} over {len(runs)} runs: {summary}", flush=True)


if __name__ == "__main__":
    main()
