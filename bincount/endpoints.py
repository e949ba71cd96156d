"""Endpoint records under the artifact root (``endpoints/<name>.json``), and the smoke request a new model must answer.

Both serving backends keep their records here, so `bincount endpoints` and the flows read an
endpoint the same way whichever backend serves it.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np

from bincount.config import Settings
from bincount.contracts.naming import check_endpoint_name
from bincount.contracts.serving import CaptureConfig, EndpointRecord
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
