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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

RECORD_SCHEMA = 1
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


@dataclass
class EndpointRecord:
    """An endpoint as recorded under the artifact root; ``details`` is backend-specific.

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
    details: dict[str, Any] = field(default_factory=dict)
    model_ref: str | None = None  # the registered version it serves (``bincount:3``)
    previous_model_ref: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema": RECORD_SCHEMA, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EndpointRecord:
        return cls(**{key: value for key, value in data.items() if key != "schema"})


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
    """

    min_replicas: int = 1
    max_replicas: int = 1
    target_in_flight: float = 4.0
    target_invocations_per_minute: int = 600
    scale_out_cooldown_s: float = 30.0
    scale_in_cooldown_s: float = 120.0

    def __post_init__(self) -> None:
        if self.min_replicas < 1:
            raise ValueError(f"min_replicas {self.min_replicas} must be at least 1")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        if self.target_in_flight <= 0 or self.target_invocations_per_minute <= 0:
            raise ValueError("the scaling targets must be positive")
        if self.scale_out_cooldown_s < 0 or self.scale_in_cooldown_s < 0:
            raise ValueError("cooldowns cannot be negative")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > self.min_replicas

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        completed or rolled back (``details["rollout"]`` says which and why); a shadow deploy returns while
        the shadow runs. ``scaling`` (None: keep the endpoint's, one replica for a new one).
        """
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
