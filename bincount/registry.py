"""What the pipeline remembers between runs, under ``{artifact_root}/registry/<endpoint>/``:

    best-hyperparameters.json   the best tuned hyperparameters and the job they came from
    decisions.jsonl             one line per nightly decision: promoted or kept, with both scores

and the promotion rule itself, so the nightly flow and its tests agree on it.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import Any

from bincount.config import Settings
from bincount.storage import ObjectNotFoundError, Storage, storage_for

PROMOTION_METRIC = "accuracy"


@dataclass
class Decision:
    """A nightly comparison of a challenger with the serving model, on the same test split."""

    endpoint_name: str
    promoted: bool
    reason: str
    metric: str
    challenger_score: float
    serving_score: float | None
    margin: float
    challenger_model_uri: str
    serving_model_uri: str | None
    decided_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    endpoint_name: str,
    challenger: dict[str, float],
    challenger_model_uri: str,
    serving: dict[str, float] | None,
    serving_model_uri: str | None,
    margin: float,
    metric: str = PROMOTION_METRIC,
) -> Decision:
    """Promote the challenger when nothing serves, or when it beats the serving model by ``margin``."""
    score = challenger[metric]
    if serving is None:
        promoted, reason = True, "no model serves this endpoint yet"
    else:
        promoted = score >= serving[metric] + margin
        comparison = "beats" if promoted else "does not beat"
        reason = f"challenger {metric} {score:.4f} {comparison} serving {serving[metric]:.4f} + margin {margin:.4f}"
    return Decision(
        endpoint_name=endpoint_name,
        promoted=promoted,
        reason=reason,
        metric=metric,
        challenger_score=score,
        serving_score=None if serving is None else serving[metric],
        margin=margin,
        challenger_model_uri=challenger_model_uri,
        serving_model_uri=serving_model_uri,
        decided_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


class Registry:
    """Best hyperparameters and decisions for one endpoint."""

    def __init__(self, settings: Settings, endpoint_name: str, storage: Storage | None = None) -> None:
        self.storage = storage or storage_for(settings)
        self.root = settings.artifact_uri("registry", endpoint_name)

    def save_best_hyperparameters(self, hyperparameters: dict[str, Any], job_name: str, score: dict[str, float]) -> None:
        document = {"hyperparameters": hyperparameters, "job_name": job_name, "score": score}
        self.storage.write_bytes(f"{self.root}/best-hyperparameters.json", json.dumps(document, indent=1).encode())

    def best_hyperparameters(self) -> dict[str, Any] | None:
        """The last saved best hyperparameters, or None when nothing was ever tuned."""
        try:
            document = json.loads(self.storage.read_bytes(f"{self.root}/best-hyperparameters.json"))
        except ObjectNotFoundError:
            return None
        return document["hyperparameters"]

    def record(self, decision: Decision) -> None:
        """Append ``decision`` to the log (read, append, write: one writer per endpoint at a time)."""
        uri = f"{self.root}/decisions.jsonl"
        try:
            previous = self.storage.read_bytes(uri)
        except ObjectNotFoundError:
            previous = b""
        self.storage.write_bytes(uri, previous + json.dumps(decision.to_dict()).encode() + b"\n")

    def decisions(self) -> list[Decision]:
        try:
            lines = self.storage.read_bytes(f"{self.root}/decisions.jsonl").decode().splitlines()
        except ObjectNotFoundError:
            return []
        return [Decision(**json.loads(line)) for line in lines if line.strip()]
