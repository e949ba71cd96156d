"""Serving: endpoints that answer an image with its count, and batch transforms over a prefix of images.

The answer format (``application/json``) every backend gives::

    {"predictions": [{"predicted_count": 3, "probabilities": {"1": 0.1, ..., "5": 0.05}}, ...]}

Batch transform output (SageMaker's layout on every backend)::

    {output_uri}/<key>.jpg.out     the JSON answer for that image
    {output_uri}/results.csv       id, key, predicted_count, prob_1.., label (where known), correct, model_version
    {output_uri}/errors.csv        the images that could not be read, and why
    {output_uri}/model.json        {"model_version": ...}: the model every .out came from (local backend)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

RECORD_SCHEMA = 2  # 1: everything backend-specific or not in ``details`` (still read)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RESULTS_NAME = "results.csv"
ERRORS_NAME = "errors.csv"
MODEL_NAME = "model.json"

ProgressFn = Callable[[int, int], None]
"""Called with (done, total) as a batch transform goes."""


class ServingError(RuntimeError):
    """An endpoint operation failed; the message says what to look at (often the host's log)."""


class DeployError(ServingError):
    """A new model could not be put in service; whatever served before still serves."""


class EndpointNotFoundError(ServingError, LookupError):
    """No endpoint of that name is recorded."""


class BatchTransformError(ValueError):
    """The transform cannot start as asked (the message says how to fix the request)."""


@dataclass(frozen=True)
class CaptureConfig:
    """Data capture of an endpoint (SageMaker's DataCaptureConfig; the format is in ``bincount/capture.py``).

    ``sampling_percentage`` 0 turns capture off. Records go under
    ``<artifact_root>/data-capture/<endpoint>/<variant>/yyyy/mm/dd/hh/``.
    """

    sampling_percentage: int = 0
    max_inline_bytes: int = 512 * 1024  # bigger request bodies are kept as a thumbnail
    queue_size: int = 2048  # records waiting for the writer; past it, requests are answered and not captured
    max_file_bytes: int = 64 * 1024 * 1024  # a file rolls past this size, and every hour

    def __post_init__(self) -> None:
        if not 0 <= self.sampling_percentage <= 100:
            raise ValueError(f"sampling_percentage {self.sampling_percentage} must be between 0 and 100")

    @property
    def enabled(self) -> bool:
        return self.sampling_percentage > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


STRATEGIES = ("all-at-once", "canary", "linear", "shadow")
Strategy = Literal["all-at-once", "canary", "linear", "shadow"]


@dataclass(frozen=True)
class RolloutStrategy:
    """How a deploy moves traffic from the current model to the new one.

    - ``all-at-once``: blue/green; every request goes to the new model once it answers its smoke request.
    - ``canary``: ``traffic_percent`` of requests go to the new model for ``bake_seconds``; if its error
      rate or p99 latency is worse than the current model's past the thresholds, traffic returns to the
      current model by itself (rolled back); else all traffic moves.
    - ``linear``: as canary, in steps of ``traffic_percent`` every ``bake_seconds`` until 100.
    - ``shadow``: the new model gets a copy of ``traffic_percent`` of requests; users' answers stay the
      current model's; agreement, latency and errors of both are reported; promotion is a separate call.

    With no model serving yet, every strategy starts the endpoint on the new model (nothing to compare).
    """

    kind: Strategy = "all-at-once"
    traffic_percent: int = 10
    bake_seconds: float = 60.0
    min_requests: int = 20  # requests on the new model before a canary step may pass
    max_error_rate_increase: float = 0.01  # new error rate minus current, as a fraction of requests
    max_latency_ratio: float = 1.5  # new p99 over current p99

    def __post_init__(self) -> None:
        if self.kind not in STRATEGIES:
            raise ValueError(f"strategy {self.kind!r} is not one of {', '.join(STRATEGIES)}")
        if self.kind != "all-at-once":
            if not 1 <= self.traffic_percent <= 99 and not (self.kind == "shadow" and self.traffic_percent == 100):
                raise ValueError(
                    f"traffic_percent {self.traffic_percent} must be between 1 and 99 "
                    "(a shadow may copy 100% of requests)"
                )
            if self.bake_seconds <= 0:
                raise ValueError(f"bake_seconds {self.bake_seconds} must be positive: a bake of zero checks nothing")
        if self.min_requests < 1:
            raise ValueError(f"min_requests {self.min_requests} must be at least 1")
        if self.max_error_rate_increase < 0 or self.max_latency_ratio < 1:
            raise ValueError("max_error_rate_increase must be >= 0 and max_latency_ratio >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScalingConfig:
    """How many model hosts (local replicas, SageMaker instances) serve an endpoint.

    The endpoint starts with ``min_replicas``; with ``max_replicas`` above it, it scales out when the
    in-flight requests per replica stay above ``target_in_flight`` and back in when idle. On SageMaker the
    same bounds register an Application Auto Scaling target with target tracking on
    ``SageMakerVariantInvocationsPerInstance`` (``target_invocations_per_minute``).

    ``min_replicas`` 0 (local backend) scales to zero: the hosts stop once the endpoint has had no request
    for ``scale_in_idle_seconds``, and the next request starts one and waits for it to load, at most
    ``cold_start_timeout_s`` (then 503 with Retry-After). A canary, linear or shadow rollout needs its
    models running, so it is refused on an endpoint that scales to zero.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    target_in_flight: float = 4.0
    target_invocations_per_minute: int = 600
    scale_out_cooldown_s: float = 30.0
    scale_in_cooldown_s: float = 120.0
    scale_in_idle_seconds: float = 600.0
    cold_start_timeout_s: float = 60.0  # a real-time invocation on SageMaker times out at 60 s

    def __post_init__(self) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas {self.min_replicas} must be 0 (scale to zero when idle) or more")
        if self.max_replicas < 1:
            raise ValueError(f"max_replicas {self.max_replicas} must be at least 1: a request needs a host")
        if self.scale_in_idle_seconds <= 0:
            raise ValueError(
                f"scale_in_idle_seconds {self.scale_in_idle_seconds} must be positive: it is how long an endpoint "
                "with min_replicas 0 goes without a request before its hosts stop"
            )
        if self.cold_start_timeout_s <= 0:
            raise ValueError(
                f"cold_start_timeout_s {self.cold_start_timeout_s} must be positive: it bounds how long a request "
                "to an endpoint scaled to zero waits for its host to start"
            )
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        if self.target_in_flight <= 0 or self.target_invocations_per_minute <= 0:
            raise ValueError("the scaling targets must be positive")
        if self.scale_out_cooldown_s < 0 or self.scale_in_cooldown_s < 0:
            raise ValueError("cooldowns cannot be negative")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > self.min_replicas

    @property
    def scales_to_zero(self) -> bool:
        return self.min_replicas == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrafficStats:
    """One variant's requests, 5xx errors (and hosts that did not answer) and p99 latency over a window: the router's
    counts since the routing last changed (local), CloudWatch's between two times (SageMaker)."""

    requests: int = 0
    errors: int = 0
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrafficStats:
        return cls(int(data.get("requests", 0)), int(data.get("errors", 0)), data.get("p99_ms"))


@dataclass(frozen=True)
class RolloutTest:
    """The statistics behind one look at a new model: Fisher's test of the error rates, and the requests on the new
    and the current model before it may pass (``verdict``: fail, pass or wait)."""

    verdict: Literal["fail", "pass", "wait"]
    test: str
    p_value: float
    alpha: float
    power: float
    needed_new: int
    needed_current: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutTest:
        needed = data.get("needed")  # schema 1 kept them as {"new": n, "current": m}
        new, current = (needed["new"], needed["current"]) if needed else (data["needed_new"], data["needed_current"])
        return cls(
            verdict=data["verdict"],
            test=data["test"],
            p_value=data["p_value"],
            alpha=data["alpha"],
            power=data["power"],
            needed_new=new,
            needed_current=current,
        )


@dataclass(frozen=True)
class RolloutStep:
    """One entry of a rollout: what happened, when, and the new model's share of requests after it; a bake (and the
    end of a shadow) with its verdict, both variants' traffic and the test behind it."""

    at: str
    action: str  # started, shadow, bake, promoted, rolled-back, stopped
    percent: int
    verdict: str | None = None  # a bake's: pass or fail
    reason: str | None = None
    current: TrafficStats | None = None
    candidate: TrafficStats | None = None
    seconds: float | None = None
    test: RolloutTest | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutStep:
        metrics = data.get("metrics") or data  # schema 1 kept the traffic under "metrics"
        current, candidate, test = metrics.get("current"), metrics.get("candidate"), metrics.get("test")
        return cls(
            at=data["at"],
            action=data["action"],
            percent=data["percent"],
            verdict=data.get("verdict"),
            reason=data.get("reason"),
            current=TrafficStats.from_dict(current) if isinstance(current, Mapping) else None,
            candidate=TrafficStats.from_dict(candidate) if isinstance(candidate, Mapping) else None,
            seconds=metrics.get("seconds"),
            test=RolloutTest.from_dict(test) if isinstance(test, Mapping) and "verdict" in test else None,
        )


@dataclass(frozen=True)
class ShadowReport:
    """A shadow beside the current model: both variants' traffic, how often their counts agreed (``compared`` 0 on
    SageMaker, which keeps no pairs of answers), the test, and whether to promote it."""

    current: TrafficStats
    shadow: TrafficStats
    compared: int
    agreement: float | None
    skipped: int  # copies not sent: the shadow had too many in flight
    promote: bool
    reason: str
    test: RolloutTest | None = None  # None: no metrics could be read
    since: str | None = None  # the traffic is counted from then (SageMaker; local: since the shadow started)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShadowReport:
        def traffic(role: str) -> TrafficStats:
            if isinstance(data.get(role), Mapping):
                return TrafficStats.from_dict(data[role])
            figures = {key: data[key].get(role) for key in ("requests", "errors", "p99_ms") if key in data}
            return TrafficStats.from_dict({key: value for key, value in figures.items() if value is not None})

        return cls(
            current=traffic("current"),
            shadow=traffic("shadow"),
            compared=data.get("compared", 0),
            agreement=data.get("agreement"),
            skipped=data.get("skipped", 0),
            promote=data["promote"],
            reason=data["reason"],
            test=RolloutTest.from_dict(data["test"]) if data.get("test") else None,
            since=data.get("since"),
        )


RolloutVerdict = Literal["started", "completed", "rolled-back", "shadowing", "promoted", "stopped"]


@dataclass(frozen=True)
class Rollout:
    """The last rollout of an endpoint: its strategy, verdict and why, its steps, and the shadow's report once a
    shadow was promoted or stopped. ``backend``: what only one backend has (SageMaker: the DeploymentConfig, the
    alarms' baseline, the traffic steps in instances)."""

    strategy: RolloutStrategy
    verdict: RolloutVerdict
    reason: str
    steps: tuple[RolloutStep, ...] = ()
    report: ShadowReport | None = None
    backend: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rollout:
        known = ("strategy", "verdict", "reason", "steps", "report", "backend", "at")
        return cls(
            strategy=RolloutStrategy(**data["strategy"]),
            verdict=data["verdict"],
            reason=data["reason"],
            steps=tuple(RolloutStep.from_dict(step) for step in data.get("steps") or ()),
            report=ShadowReport.from_dict(data["report"]) if data.get("report") else None,
            # schema 1 kept SageMaker's facts beside the verdict
            backend=dict(data.get("backend") or {key: value for key, value in data.items() if key not in known}),
        )


@dataclass(frozen=True)
class EndpointVariant:
    """A model an endpoint runs: local, a variant of the router; SageMaker, a production or shadow variant."""

    id: str  # local: the router's variant id; SageMaker: the variant name (AllTraffic, Shadow)
    version: str  # the weights' version
    model_ref: str | None  # the registered version (``bincount:3``)
    weight: int  # percent of requests it answers
    shadow_percent: int | None = None  # a shadow: the percent of requests it gets a copy of
    replicas: int | None = None  # model hosts (SageMaker: instances)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EndpointVariant:
        return cls(
            id=data["id"] if "id" in data else data["name"],  # schema 1 on SageMaker: name, model_version
            version=data["version"] if "version" in data else data["model_version"],
            model_ref=data.get("model_ref"),
            weight=data["weight"],
            shadow_percent=data.get("shadow_percent", data.get("copied_percent")),
            replicas=data.get("replicas"),
        )


@dataclass(frozen=True)
class ShadowVariant:
    """The model a shadow runs beside the one that answers. ``backend``: what only one backend has (SageMaker: its
    Model's name)."""

    variant: str
    model_uri: str
    version: str
    model_ref: str | None
    percent: int  # of requests copied to it
    started_at: str
    backend: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], percent: int, started_at: str) -> ShadowVariant:
        """``percent`` and ``started_at``: for records of schema 1, which did not keep them on the local backend."""
        known = ("variant", "id", "model_uri", "version", "model_ref", "sampling_percent", "percent", "started_at")
        backend = data.get("backend")
        if backend is None:  # schema 1
            backend = {key: value for key, value in data.items() if key not in (*known, "strategy", "report")}
        return cls(
            variant=data.get("variant") or data["id"],
            model_uri=data["model_uri"],
            version=data["version"],
            model_ref=data.get("model_ref"),
            percent=data.get("percent", data.get("sampling_percent", percent)),
            started_at=data.get("started_at", started_at),
            backend=dict(backend),
        )


@dataclass(frozen=True)
class ServingPath:
    """Which forward a local endpoint's hosts run (``eager``, an optimized form) and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class EndpointRecord:
    """An endpoint as recorded under the artifact root, the same on both backends but for ``details``: what only
    one backend has (local: the router's pid, port and workdir; SageMaker: the endpoint config, Model and alarms).

    ``version`` names the weights (the first 12 hex digits of model.pt's SHA-256); ``model_ref`` the
    registry version they were deployed as.
    """

    name: str
    url: str
    model_uri: str
    version: str
    arch: str
    image_size: int
    classes: list[int]
    backend: str
    deployed_at: str
    previous_model_uri: str | None = None
    previous_version: str | None = None
    model_ref: str | None = None  # the registered version it serves (``bincount:3``)
    previous_model_ref: str | None = None
    variants: tuple[EndpointVariant, ...] = ()
    rollout: Rollout | None = None
    shadow: ShadowVariant | None = None  # while a shadow runs
    capture: CaptureConfig | None = None  # None: off
    capture_uri: str | None = None
    scaling: ScalingConfig | None = None  # None: never given (SageMaker: a fixed deploy_instance_count)
    replicas: int | None = None  # of the model that answers (SageMaker: instances)
    serving: ServingPath | None = None  # local
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": RECORD_SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EndpointRecord:
        """A record of this schema, or of schema 1 (written before the typed fields: they were all in ``details``)."""
        fields = {key: value for key, value in data.items() if key != "schema"}
        if data.get("schema", 1) == 1:
            details = dict(fields.get("details") or {})
            moved = ("variants", "rollout", "shadow", "capture", "capture_uri", "scaling", "replicas", "serving")
            fields.update({key: details.pop(key) for key in moved if key in details})
            if fields.get("replicas") is None and "instance_count" in details:
                fields["replicas"] = details.pop("instance_count")
            fields["details"] = details
        rollout = Rollout.from_dict(fields["rollout"]) if fields.get("rollout") else None
        shadow = fields.get("shadow")
        percent = rollout.strategy.traffic_percent if rollout else 0
        return cls(
            **{
                **fields,
                "classes": [int(count) for count in fields["classes"]],
                "variants": tuple(EndpointVariant.from_dict(variant) for variant in fields.get("variants") or ()),
                "rollout": rollout,
                "shadow": ShadowVariant.from_dict(shadow, percent, fields["deployed_at"]) if shadow else None,
                "capture": CaptureConfig(**fields["capture"]) if fields.get("capture") else None,
                "scaling": ScalingConfig(**fields["scaling"]) if fields.get("scaling") else None,
                "serving": ServingPath(**fields["serving"]) if fields.get("serving") else None,
            }
        )


@dataclass
class BatchTransformSummary:
    """What a batch transform did; plain values only (a Prefect task returns it)."""

    input_uri: str
    output_uri: str
    model_version: str
    images: int  # image objects under the input prefix
    scored: int  # scored in this run
    skipped: int  # already done by an earlier run
    failed: int  # unreadable images (see errors)
    seconds: float
    images_per_s: float  # scored in this run / seconds spent scoring
    results_uri: str
    errors_uri: str | None
    accuracy: float | None  # over the images with a known label
    errors: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_answer(answer: bytes, classes: list[int]) -> int:
    """The count in a JSON answer; raises ServingError when the answer is not a valid prediction."""
    try:
        prediction = json.loads(answer)["predictions"][0]
        count = int(prediction["predicted_count"])
        total = sum(prediction["probabilities"].values())
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise ServingError(f"the answer is not a prediction ({error}): {answer[:200]!r}") from None
    if count not in classes or abs(total - 1.0) > 1e-3:
        raise ServingError(f"implausible answer: count {count}, probabilities summing to {total}")
    return count


class ServingBackend(Protocol):
    """What the deploy and batch transform tasks need from a place that serves models."""

    def deploy(
        self,
        name: str,
        model_uri: str,
        model_ref: str | None = None,
        capture: CaptureConfig | None = None,
        strategy: RolloutStrategy | None = None,
        scaling: ScalingConfig | None = None,
    ) -> EndpointRecord:
        """Start ``name`` on ``model_uri`` (registered as ``model_ref``), or replace its model without dropping
        a request.

        ``capture`` samples requests and answers into the data-capture prefix (None or 0%: off).
        ``strategy`` (None: all at once) says how traffic moves; a canary or linear deploy returns when it
        completed or rolled back (the record's ``rollout`` says which and why); a shadow deploy returns while
        the shadow runs. ``scaling`` (None: keep the endpoint's, one replica for a new one).
        """
        ...

    def shadow_report(self, name: str) -> ShadowReport:
        """How the shadow of ``name`` does against the current model; raises :class:`ServingError` with no shadow."""
        ...

    def promote_shadow(self, name: str) -> EndpointRecord:
        """Make the shadow model of ``name`` the one that answers; raises :class:`ServingError` with no shadow."""
        ...

    def stop_shadow(self, name: str) -> EndpointRecord:
        """Stop the shadow of ``name``; the current model keeps serving."""
        ...

    def describe(self, name: str) -> EndpointRecord:
        """The record of ``name``; raises :class:`EndpointNotFoundError`."""
        ...

    def invoke(self, name: str, body: bytes, content_type: str, accept: str = "application/json") -> bytes:
        """One request through the endpoint, as a client sends it."""
        ...

    def delete(self, name: str) -> None:
        """Stop ``name`` and forget its record; raises :class:`EndpointNotFoundError`."""
        ...

    def batch_transform(
        self,
        model_uri: str,
        input_uri: str,
        output_uri: str,
        *,
        batch_size: int = 16,
        labels_uri: str | None = None,
        progress: ProgressFn | None = None,
        rescore: bool = False,
    ) -> BatchTransformSummary:
        """Score every image under ``input_uri`` into ``output_uri`` (the layout above); ``rescore`` scores
        again what an earlier run (maybe of another model) left there."""
        ...
