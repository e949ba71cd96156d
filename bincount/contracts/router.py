"""What a local endpoint's router and the local serving backend say to each other.

The backend writes a :class:`RouterState` to the router's state file (``<workdir>/router.json``) and sends
SIGHUP; the router answers ``GET /router/status`` with a :class:`RouterStatus`. Both sides build and read
these records; JSON appears only in ``to_dict``/``from_dict``. The JSON of both is the one written before
these records existed, so a state file of a running endpoint and an operator's ``curl`` read the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from bincount.contracts.serving import CaptureConfig, ScalingConfig, TrafficStats

UNRECORDED_REPLICA_CAPACITY = 12  # for state files written before the backend recorded HostOptions.max_in_flight
RouterMode = Literal["canary", "shadow"]


class RouterStateError(ValueError):
    """A router state file that cannot be read (the message says which and what to do)."""


@dataclass(frozen=True)
class VariantSpec:
    """A model the router runs: the unpacked model directory its hosts load, and what it is."""

    model_dir: str
    version: str  # the weights' version
    model_uri: str
    model_ref: str | None = None  # the registered version (``bincount:3``)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantSpec:
        return cls(data["model_dir"], data["version"], data["model_uri"], data.get("model_ref"))


@dataclass(frozen=True)
class CaptureTarget:
    """What the router captures (``config``) and where: a prefix and the S3 it is on."""

    config: CaptureConfig
    destination: str
    s3_endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaptureTarget:
        return cls(
            CaptureConfig(**data["config"]), data["destination"], data.get("s3_endpoint_url"), data.get("region")
        )


@dataclass(frozen=True)
class RouterState:
    """The router's state file: the variants, the one that answers (``current``) and at most one ``candidate`` that
    takes ``percent`` of requests (``mode`` canary) or a copy of them (``mode`` shadow), how many hosts to run, what
    to capture, and how to start a host."""

    variants: Mapping[str, VariantSpec]
    current: str
    candidate: str | None = None
    mode: RouterMode = "canary"
    percent: int = 0
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    capture: CaptureTarget | None = None
    bind_host: str = "127.0.0.1"
    workdir: str | None = None  # None: the state file's folder
    host_args: tuple[str, ...] = ()
    replica_capacity: int = UNRECORDED_REPLICA_CAPACITY  # requests in flight per host before one waits

    def __post_init__(self) -> None:
        for role, variant in (("current", self.current), ("candidate", self.candidate)):
            if variant is not None and variant not in self.variants:
                raise RouterStateError(
                    f"the {role} variant {variant!r} is not one of the variants {list(self.variants)}"
                )

    @property
    def routing(self) -> tuple[str, str | None, RouterMode, int]:
        return self.current, self.candidate, self.mode, self.percent

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the router state") -> RouterState:
        """A state as the backend writes it (also one written before these records: the same keys, fewer of them)."""
        try:
            return cls(
                variants={key: VariantSpec.from_dict(spec) for key, spec in data["variants"].items()},
                current=data["current"],
                candidate=data.get("candidate"),
                mode=data.get("mode", "canary"),
                percent=data.get("percent", 0),
                scaling=ScalingConfig(**data["scaling"]) if data.get("scaling") else ScalingConfig(),
                capture=CaptureTarget.from_dict(data["capture"]) if data.get("capture") else None,
                bind_host=data.get("bind_host", "127.0.0.1"),
                workdir=data.get("workdir"),
                host_args=tuple(data.get("host_args", ())),
                replica_capacity=data.get("replica_capacity", UNRECORDED_REPLICA_CAPACITY),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as error:  # ValueError: a field out of range
            raise RouterStateError(
                f"{source} is not a router state ({type(error).__name__}: {error}): deploy the endpoint again "
                "(`bincount delete-endpoint NAME`, then deploy) to write a new one"
            ) from None


@dataclass(frozen=True)
class ReplicaStatus:
    """One model host of a variant."""

    url: str
    pid: int
    inflight: int
    ready: bool


@dataclass(frozen=True)
class VariantStatus:
    """One variant as the router runs it: its hosts, and its traffic since the routing last changed (the backend's
    canary judges on it), with the shadow's agreement."""

    version: str
    model_ref: str | None
    model_uri: str | None
    replicas: tuple[ReplicaStatus, ...]
    ready: int
    waiting: int  # requests held for room on a host
    restarts: int
    failed: str | None  # why its hosts cannot start (the host's log)
    traffic: TrafficStats
    compared: int = 0  # shadow copies whose count was compared with the current model's
    agreed: int = 0
    skipped: int = 0  # shadow copies not sent (too many in flight)

    def to_dict(self) -> dict[str, Any]:
        """Flat, as ``/router/status`` always gave it: the traffic's figures beside the rest."""
        fields = {key: value for key, value in asdict(self).items() if key != "traffic"}
        traffic = self.traffic
        figures = {"requests": traffic.requests, "errors": traffic.errors, "error_rate": traffic.error_rate}
        return {**fields, **figures, "p99_ms": traffic.p99_ms}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantStatus:
        return cls(
            version=data["version"],
            model_ref=data.get("model_ref"),
            model_uri=data.get("model_uri"),
            replicas=tuple(ReplicaStatus(**replica) for replica in data["replicas"]),
            ready=data["ready"],
            waiting=data.get("waiting", 0),
            restarts=data.get("restarts", 0),
            failed=data.get("failed"),
            traffic=TrafficStats.from_dict(data),
            compared=data.get("compared", 0),
            agreed=data.get("agreed", 0),
            skipped=data.get("skipped", 0),
        )


@dataclass(frozen=True)
class ScalingEvent:
    """The router added (``out``) or stopped (``in``) a host of the current variant."""

    at: str
    scaled: Literal["in", "out"]
    replicas: int  # after it
    in_flight_per_replica: float


@dataclass(frozen=True)
class CaptureStatus:
    """The router's capture writer's counts (:class:`bincount.capture.CaptureStats`, which says what each means)."""

    offered: int = 0
    captured: int = 0
    stored: int = 0
    pending: int = 0
    pending_files: int = 0
    recovered: int = 0
    dropped: int = 0
    failed: int = 0
    files: int = 0
    upload_failures: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class RouterStatus:
    """What ``GET /router/status`` answers: the routing, each variant, scaling and capture."""

    name: str
    current: str | None
    candidate: str | None
    mode: RouterMode
    percent: int
    target: str | None  # the current variant's least busy ready host
    version: str | None  # the current variant's weights
    variants: Mapping[str, VariantStatus]
    scaling: ScalingConfig
    scaled_to_zero: bool = False  # the current variant's hosts stopped for want of requests
    scaling_events: tuple[ScalingEvent, ...] = ()  # the last 20
    capture: CaptureStatus | None = None  # None: not capturing

    @property
    def current_variant(self) -> VariantStatus | None:
        return self.variants.get(self.current) if self.current else None

    @property
    def candidate_variant(self) -> VariantStatus | None:
        return self.variants.get(self.candidate) if self.candidate else None

    def weight(self, variant_id: str) -> int:
        """The percent of requests the variant answers (a shadow answers none: it gets copies)."""
        if variant_id == self.candidate:
            return self.percent if self.mode == "canary" else 0
        if variant_id == self.current:
            return 100 - self.percent if self.candidate and self.mode == "canary" else 100
        return 0  # retiring

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "variants": {key: variant.to_dict() for key, variant in self.variants.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouterStatus:
        """The status a router answers (one from before scale to zero lacks its fields: read as never scaled)."""
        return cls(
            name=data["name"],
            current=data.get("current"),
            candidate=data.get("candidate"),
            mode=data.get("mode", "canary"),
            percent=data.get("percent", 0),
            target=data.get("target"),
            version=data.get("version"),
            variants={key: VariantStatus.from_dict(variant) for key, variant in data["variants"].items()},
            scaling=ScalingConfig(**data["scaling"]) if data.get("scaling") else ScalingConfig(),
            scaled_to_zero=bool(data.get("scaled_to_zero", False)),
            scaling_events=tuple(ScalingEvent(**event) for event in data.get("scaling_events") or ()),
            capture=CaptureStatus(**data["capture"]) if data.get("capture") else None,
        )
