"""Endpoint records under the artifact root (``endpoints/<name>.json``), and the smoke request a new model must answer.

Both serving backends keep their records here, so `bincount endpoints` and the flows read an
endpoint the same way whichever backend serves it.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import numpy as np

from bincount.config import Settings
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.serving import CaptureConfig, EndpointRecord, RolloutStrategy, ScalingConfig
from bincount.demo_data import jpeg_bytes, render_bin_image
from bincount.storage import ObjectNotFoundError, Storage


class EndpointRecords:
    """Read, write and delete the records of named endpoints."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage

    def uri(self, name: str) -> str:
        return self.settings.artifact_uri("endpoints", f"{check_endpoint_name(name)}.json")

    def read(self, name: str) -> EndpointRecord | None:
        try:
            return EndpointRecord.from_dict(json.loads(self.storage.read_bytes(self.uri(name))))
        except ObjectNotFoundError:
            return None

    def write(self, record: EndpointRecord) -> None:
        self.storage.write_bytes(self.uri(record.name), json.dumps(record.to_dict(), indent=2).encode())

    def delete(self, name: str) -> None:
        self.storage.delete(self.uri(name))

    def names(self) -> list[str]:
        """Every recorded endpoint's name."""
        base = self.settings.artifact_uri("endpoints").rstrip("/") + "/"
        return sorted(
            info.uri[len(base) : -len(".json")]
            for info in self.storage.list(self.settings.artifact_uri("endpoints"))
            if info.uri.endswith(".json") and "/" not in info.uri[len(base) :]
        )


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def smoke_image(image_size: int) -> bytes:
    """A synthetic bin photo (two items) at the model's size, to check a new model end to end."""
    return jpeg_bytes(render_bin_image(2, np.random.default_rng(0), size=max(image_size, 32)))


def recorded_capture(record: EndpointRecord | None) -> CaptureConfig:
    """The capture setting an endpoint was last deployed with (off for a new one)."""
    recorded = record.details.get("capture") if record else None
    return CaptureConfig(**recorded) if recorded else CaptureConfig()


def recorded_scaling(record: EndpointRecord | None) -> ScalingConfig:
    """The scaling an endpoint was last deployed with (one replica for a new one)."""
    recorded = record.details.get("scaling") if record else None
    return ScalingConfig(**recorded) if recorded else ScalingConfig()


def shadow_verdict(current: dict[str, Any], shadow: dict[str, Any], strategy: RolloutStrategy) -> dict[str, Any]:
    """Whether to promote a shadow, from both variants' ``requests``, ``errors`` and ``p99_ms`` and the shadow's
    ``compared``/``agreed`` counts: the same thresholds as a canary step. Agreement is reported, not judged:
    a better model disagrees exactly where the current one is wrong."""
    compared, agreed = shadow.get("compared", 0), shadow.get("agreed", 0)
    report: dict[str, Any] = {
        "requests": {"current": current["requests"], "shadow": shadow["requests"]},
        "errors": {"current": current["errors"], "shadow": shadow["errors"]},
        "p99_ms": {"current": current["p99_ms"], "shadow": shadow["p99_ms"]},
        "compared": compared,
        "agreement": agreed / compared if compared else None,
        "skipped": shadow.get("skipped", 0),
    }
    error_increase = (shadow["errors"] / shadow["requests"] if shadow["requests"] else 0.0) - (
        current["errors"] / current["requests"] if current["requests"] else 0.0
    )
    if shadow["requests"] < strategy.min_requests:
        needed = strategy.min_requests
        promote, reason = False, f"only {shadow['requests']} requests reached the shadow ({needed} needed)"
    elif error_increase > strategy.max_error_rate_increase:
        promote, reason = False, f"its error rate is {error_increase:+.1%} against the current model's"
    elif current["p99_ms"] and shadow["p99_ms"] and shadow["p99_ms"] > strategy.max_latency_ratio * current["p99_ms"]:
        promote, reason = (
            False,
            (
                f"its p99 latency {shadow['p99_ms']:.0f} ms is over x{strategy.max_latency_ratio} "
                f"the current {current['p99_ms']:.0f} ms"
            ),
        )
    else:
        promote, reason = True, "errors and latency within the thresholds"
    return {**report, "promote": promote, "reason": reason}
