"""Model monitoring: a baseline from the training side, and captured traffic compared with it.

A baseline (JSON, stored with the model version: ``ModelVersionSpec.baseline_uri``) holds the
training side's count distribution and a sample of cheap input statistics per image (brightness,
contrast, width, height, channel means). A monitor window (the capture records since the last run, read
as a stream into a :class:`TrafficWindow`) gives request count, the model's error rate (its 5xx; the
callers' 4xx are counted apart; where records carry no status, the platform's counts), latency
percentiles (the router's own numbers), the predicted-count distribution and the same input statistics.
Drift: PSI and a chi-square test for the counts, a two-sample Kolmogorov-Smirnov test per input
statistic; thresholds are :class:`DriftThresholds`. Where the request carried an ABID id as its
``InferenceId`` and ``metadata/<id>.json`` exists under the labels source, live accuracy and RMSE.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import random
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from bincount.capture import CaptureReader, CaptureRecord, format_time, parse_time
from bincount.contracts.metrics import InvocationCounts
from bincount.manifest import CLASSES, metadata_uri
from bincount.models import fetch_model
from bincount.storage import ObjectNotFoundError, Storage, StorageError, join_uri
from sm_scripts import inference

BASELINE_SCHEMA = 1
FEATURES = ("brightness", "contrast", "width", "height", "mean_r", "mean_g", "mean_b")
_STATS_PX = 128  # statistics are taken on a reduced decode: cheap, and the same for training and traffic
_EPS = 1e-4
MAX_KEPT = 20_000  # latencies and input statistics kept per window: a uniform sample past this


class BaselineError(ValueError):
    """A baseline cannot be made or read; the message says what is missing."""


def image_statistics(data: bytes) -> dict[str, float]:
    """Brightness (mean luma), contrast (luma std), size and channel means of one JPEG/PNG, in [0, 255] and px."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        image.draft("RGB", (_STATS_PX, _STATS_PX))
        small = image.convert("RGB")
        small.thumbnail((_STATS_PX, _STATS_PX))
    pixels = np.asarray(small, dtype=np.float32)
    luma = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    means = pixels.reshape(-1, 3).mean(axis=0)
    return {
        "brightness": float(luma.mean()),
        "contrast": float(luma.std()),
        "width": float(width),
        "height": float(height),
        "mean_r": float(means[0]),
        "mean_g": float(means[1]),
        "mean_b": float(means[2]),
    }


@dataclass
class Baseline:
    """What the model was trained on, as the monitor compares it."""

    model_uri: str
    split_uri: str
    count_shares: dict[str, float]  # "1".."5" -> share of the training side's labels
    predicted_shares: dict[str, float]  # "1".."5" -> share of the model's answers on the sampled training images
    features: dict[str, list[float]]  # statistic -> one value per sampled training image
    images: int

    def to_json(self) -> bytes:
        return json.dumps({"schema": BASELINE_SCHEMA, **asdict(self)}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Baseline:
        document = json.loads(data)
        if document.get("schema") != BASELINE_SCHEMA:
            raise BaselineError(f"baseline schema {document.get('schema')} is not {BASELINE_SCHEMA}: compute it again")
        return cls(**{key: value for key, value in document.items() if key != "schema"})


def compute_baseline(storage: Storage, split_uri: str, model_uri: str, sample: int = 300, seed: int = 0) -> Baseline:
    """The training side's label shares (every image), and on ``sample`` of its images (seeded) the model's
    predicted shares and the input statistics: live answers are compared with the model's own answers on
    what it was trained on, so a model's bias is not mistaken for drift.

    Images are read from the dataset's channels (``<dataset>/channels/train/<label>/<id>.jpg``).
    """
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(split_uri)), dtype={"id": str})
    except ObjectNotFoundError:
        raise BaselineError(f"no split manifest at {split_uri}: cannot compute the training baseline") from None
    train = table[table["split"] == "train"]
    if train.empty:
        raise BaselineError(f"{split_uri} has no training side")
    counts = Counter(int(label) for label in train["label"])
    shares = {str(c): counts.get(c, 0) / len(train) for c in CLASSES}
    channels = join_uri(split_uri.rsplit("/", 1)[0], "channels", "train")
    chosen = train.sample(n=min(sample, len(train)), random_state=seed)
    features: dict[str, list[float]] = {name: [] for name in FEATURES}
    predicted: Counter[int] = Counter()
    with tempfile.TemporaryDirectory(prefix="bincount-baseline-") as scratch:
        model = inference.model_fn(str(fetch_model(storage, model_uri, Path(scratch))[0]))
        rows = list(chosen.itertuples())
        for start in range(0, len(rows), 32):
            images = []
            for row in rows[start : start + 32]:
                data = storage.read_bytes(join_uri(channels, str(row.label), f"{row.id}.jpg"))
                values = image_statistics(data)
                for name in FEATURES:
                    features[name].append(round(values[name], 3))
                images.extend(inference.input_fn(data, "image/jpeg"))
            predicted.update(p["predicted_count"] for p in inference.predict_fn(images, model))
    predicted_shares = {str(c): predicted.get(c, 0) / len(rows) for c in CLASSES}
    return Baseline(model_uri, split_uri, shares, predicted_shares, features, len(rows))


def store_baseline(storage: Storage, baseline_uri: str, split_uri: str, model_uri: str) -> str:
    """Compute the baseline of a model trained on ``split_uri``, store it at ``baseline_uri`` (once); return the URI."""
    if not storage.exists(baseline_uri):
        storage.write_bytes(baseline_uri, compute_baseline(storage, split_uri, model_uri).to_json())
    return baseline_uri


def load_baseline(storage: Storage, baseline_uri: str | None) -> Baseline | None:
    """The baseline at ``baseline_uri``; None when the version has none (registered before baselines existed)."""
    if baseline_uri is None:
        return None
    try:
        return Baseline.from_json(storage.read_bytes(baseline_uri))
    except ObjectNotFoundError:
        return None


class DriftThresholds(BaseModel):
    """When the monitor calls drift (flow parameters)."""

    model_config = ConfigDict(frozen=True)

    psi: float = Field(
        default=0.2,
        gt=0,
        description="PSI of the predicted counts above which they drifted (0.1 small, 0.25 large; with chi2_alpha).",
    )
    chi2_alpha: float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="Chi-square p-value (baseline vs live counts) below which the counts drifted.",
    )
    ks_statistic: float = Field(
        default=0.2, gt=0, le=1, description="KS distance above which an input statistic drifted (with ks_alpha)."
    )
    ks_alpha: float = Field(default=0.01, gt=0, lt=1, description="KS p-value below which an input statistic drifted.")
    min_requests: int = Field(
        default=30, ge=1, description="Fewer captured requests than this in the window: no verdict."
    )
    max_error_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="The model's error rate (its 5xx; callers' 4xx never count) above which "
        "bincount.monitor.error-rate-high is emitted (rollback automation).",
    )


@dataclass
class MonitorReport:
    """One endpoint's window of traffic against its baseline. ``verdict``: ok, drift, no-traffic, no-baseline.

    ``errors`` are the model's (5xx, a runtime ``ModelError`` wrapping one); ``client_errors`` the callers' (4xx:
    a wrong content type, an oversized or empty body), reported apart and never in ``error_rate``. The rate's
    denominator is the captured requests, or where the platform counts them (``error_source``), its invocations.
    """

    endpoint: str
    model_version: str | None
    verdict: str
    message: str
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    error_rate: float = 0.0
    error_rate_high: bool = False
    error_source: str = "capture"
    invocations: int | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    predicted_shares: dict[str, float] = field(default_factory=dict)
    baseline_shares: dict[str, float] = field(default_factory=dict)
    psi: float | None = None
    chi2_p: float | None = None
    features: list[dict[str, Any]] = field(default_factory=list)  # name, baseline mean, live mean, ks, p, drift
    drifted: list[str] = field(default_factory=list)
    labelled: int = 0
    accuracy: float | None = None
    rmse: float | None = None
    window_start: str | None = None
    window_end: str | None = None
    skipped: int = 0  # capture lines skipped (listed in problems, the first of them)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def psi(expected: dict[str, float], actual: dict[str, float]) -> float:
    """Population stability index over the same categories (shares floored at a small epsilon; smooth them first)."""
    total = 0.0
    for key, share in expected.items():
        e, a = max(share, _EPS), max(actual.get(key, 0.0), _EPS)
        total += (a - e) * math.log(a / e)
    return total


def _smoothed_shares(counts: np.ndarray) -> list[float]:
    """Shares with half a count added to each class, so a class one side never saw does not weigh without bound."""
    return list((counts + 0.5) / (counts.sum() + 0.5 * len(counts)))


def error_kind(record: CaptureRecord) -> Literal["ok", "model", "client"]:
    """Whose fault a captured answer's failure is: the model's (5xx; the runtime's ``ModelError`` 424 around a
    5xx, or around an unknown status), the caller's (any other 4xx), or no failure (2xx, or no status recorded)."""
    status = record.status
    if status is None or status < 400:
        return "ok"
    if status == 424:
        original = record.original_status
        return "model" if original is None or original >= 500 else "client"
    return "model" if status >= 500 else "client"


def _prediction(record: CaptureRecord) -> int | None:
    if record.output_encoding != "JSON":
        return None
    try:
        return int(json.loads(record.output_data)["predictions"][0]["predicted_count"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


@dataclass
class TrafficWindow:
    """The running figures of one window of captured requests, built record by record (:meth:`add`): the
    window's records, base64 images included, are never held at once; each image is reduced to its
    statistics as it is read. Latencies and input statistics are kept for at most :data:`MAX_KEPT` requests
    each, a uniform sample of the window past that (a seeded reservoir), so memory stays flat in the
    window's size but for ``identified`` (one id a request that carried one, for live accuracy)."""

    requests: int = 0
    model_errors: int = 0
    client_errors: int = 0
    latencies: list[float] = field(default_factory=list)
    predicted: Counter[int] = field(default_factory=Counter)
    identified: list[tuple[str, int]] = field(default_factory=list)  # (inference id, predicted count)
    features: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in FEATURES})
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    problems: list[str] = field(default_factory=list)
    skipped: int = 0
    timed: int = 0  # requests with a latency (``latencies`` holds a sample of them past MAX_KEPT)
    measured: int = 0  # requests with input statistics (``features`` holds a sample of them past MAX_KEPT)
    _draws: random.Random = field(default_factory=lambda: random.Random(0), init=False, repr=False, compare=False)

    def _sample(self, columns: list[list[float]], seen: int, values: list[float]) -> None:
        """Put the ``seen``-th request's values (from 0; one per column) in a uniform sample of at most MAX_KEPT:
        appended while the sample is short, then at a random place or not at all (reservoir sampling, algorithm R)."""
        if seen < MAX_KEPT:
            for column, value in zip(columns, values, strict=True):
                column.append(value)
            return
        slot = self._draws.randrange(seen + 1)
        if slot < MAX_KEPT:
            for column, value in zip(columns, values, strict=True):
                column[slot] = value

    def add(self, record: CaptureRecord) -> None:
        """Count one record: its error, latency, prediction and (whole images only) input statistics."""
        self.requests += 1
        if record.latency_ms is not None:
            self._sample([self.latencies], self.timed, [record.latency_ms])
            self.timed += 1
        kind = error_kind(record)
        if kind != "ok":
            self.model_errors += kind == "model"
            self.client_errors += kind == "client"
            return
        prediction = _prediction(record)
        if prediction is not None:
            self.predicted[prediction] += 1
            if record.inference_id:
                self.identified.append((record.inference_id, prediction))
        if record.input_kept != "inline":
            return  # a thumbnail's size and pixels are not the request's (SageMaker's records are whole)
        data = record.image()
        if data is None:
            return
        try:
            values = image_statistics(data)
        except (OSError, ValueError, Image.DecompressionBombError):
            return
        self._sample([self.features[name] for name in FEATURES], self.measured, [values[name] for name in FEATURES])
        self.measured += 1

    @classmethod
    def read(cls, reader: CaptureReader) -> TrafficWindow:
        """Every record ``reader`` streams; its span, skipped lines and problems."""
        window = cls()
        for record in reader:
            window.add(record)
        window.start, window.end = reader.earliest, reader.latest
        window.problems, window.skipped = list(reader.problems), reader.skipped
        return window


def ground_truth(storage: Storage, labels_uri: str, ids: list[str], problems: list[str]) -> dict[str, int]:
    """``EXPECTED_QUANTITY`` from ``<labels_uri>/metadata/<id>.json`` for the ids that have one.

    An id without readable metadata is left out; a labels source that cannot be read at all (unreachable,
    access denied) stops the lookup with a line in ``problems``, so live quality is skipped, not the report.
    """
    labels: dict[str, int] = {}
    for image_id in ids:
        try:
            labels[image_id] = int(
                json.loads(storage.read_bytes(metadata_uri(labels_uri, image_id)))["EXPECTED_QUANTITY"]
            )
        except (ObjectNotFoundError, ValueError, KeyError, TypeError):
            continue
        except StorageError as error:
            problems.append(f"labels at {labels_uri} cannot be read ({error}): no live accuracy this run")
            break
    return labels


def monitor_window(
    endpoint: str,
    window: TrafficWindow,
    baseline: Baseline | None,
    thresholds: DriftThresholds,
    *,
    labels: dict[str, int] | None = None,
    model_version: str | None = None,
    invocations: InvocationCounts | None = None,
) -> MonitorReport:
    """Compare one window of captured traffic with ``baseline`` (None: traffic figures only). ``invocations``:
    the platform's own counts for the window, where capture records carry no status (the error rate is theirs)."""
    report = MonitorReport(endpoint, model_version, "ok", "", problems=list(window.problems), skipped=window.skipped)
    report.requests = window.requests
    report.window_start = format_time(window.start) if window.start else None
    report.window_end = format_time(window.end) if window.end else None
    if not window.requests:
        report.verdict, report.message = "no-traffic", "no captured requests since the last run: nothing to compare"
        return report
    _errors(report, window, thresholds, invocations)
    if window.latencies:
        report.latency_ms = {f"p{q}": float(np.percentile(window.latencies, q)) for q in (50, 90, 99)}
    answered = sum(window.predicted.values())
    report.predicted_shares = {str(c): window.predicted.get(c, 0) / max(answered, 1) for c in CLASSES}
    if labels:
        _live_quality(report, window, labels)
    if baseline is None:
        report.verdict = "no-baseline"
        report.message = (
            f"no baseline stored for model {model_version or '?'} (registered before baselines existed): "
            "traffic figures only"
        )
        return report
    if answered < thresholds.min_requests:
        report.verdict = "no-traffic"
        report.message = f"{answered} answered requests, fewer than min_requests={thresholds.min_requests}: no verdict"
        return report
    _count_drift(report, baseline, window.predicted, thresholds)
    _feature_drift(report, window, baseline, thresholds)
    if report.drifted:
        report.verdict, report.message = "drift", "drift in " + "; ".join(report.drifted)
    else:
        report.message = f"{window.requests} requests, no drift (PSI {report.psi:.3f})"
    return report


def _errors(
    report: MonitorReport, window: TrafficWindow, thresholds: DriftThresholds, invocations: InvocationCounts | None
) -> None:
    """The model's error rate (and the callers' errors, apart) from the capture, or from the platform's counts."""
    if invocations is None:
        report.errors, report.client_errors, total = window.model_errors, window.client_errors, window.requests
    else:
        report.errors, report.client_errors = invocations.model_errors, invocations.client_errors
        report.invocations = total = invocations.invocations
        report.error_source = invocations.source
    report.error_rate = report.errors / total if total else 0.0
    report.error_rate_high = report.error_rate > thresholds.max_error_rate


def _live_quality(report: MonitorReport, window: TrafficWindow, labels: dict[str, int]) -> None:
    """Live accuracy and RMSE over the answered requests whose id has a label."""
    pairs = [(labels[image_id], predicted) for image_id, predicted in window.identified if image_id in labels]
    if pairs:
        truth, predicted = np.array(pairs).T
        report.labelled = len(pairs)
        report.accuracy = float((truth == predicted).mean())
        report.rmse = float(np.sqrt(((truth - predicted) ** 2).mean()))


def _count_drift(report: MonitorReport, baseline: Baseline, counted: Counter, thresholds: DriftThresholds) -> None:
    """PSI and a chi-square test of the predicted counts against the baseline's; both must agree to call drift."""
    report.baseline_shares = baseline.predicted_shares
    reference = np.array([baseline.predicted_shares[str(c)] * baseline.images for c in CLASSES])
    observed = np.array([counted.get(c, 0) for c in CLASSES], dtype=float)
    smoothed = {str(c): share for c, share in zip(CLASSES, _smoothed_shares(reference), strict=True)}
    report.psi = psi(smoothed, dict(zip(report.predicted_shares, _smoothed_shares(observed), strict=True)))
    table = np.vstack([reference, observed])
    table = table[:, table.sum(axis=0) > 0]  # a class neither side predicted says nothing
    report.chi2_p = float(stats.chi2_contingency(table).pvalue) if table.shape[1] > 1 else 1.0
    if report.psi > thresholds.psi and report.chi2_p < thresholds.chi2_alpha:
        report.drifted.append(f"predicted counts (PSI {report.psi:.2f}, chi-square p {report.chi2_p:.1e})")


def _feature_drift(
    report: MonitorReport, window: TrafficWindow, baseline: Baseline, thresholds: DriftThresholds
) -> None:
    """A KS test of each input statistic against the baseline's."""
    for name in FEATURES:
        live = window.features[name]
        if len(live) < thresholds.min_requests or not baseline.features.get(name):
            continue
        result = stats.ks_2samp(baseline.features[name], live)
        drift = bool(result.statistic > thresholds.ks_statistic and result.pvalue < thresholds.ks_alpha)
        report.features.append(
            {
                "feature": name,
                "baseline mean": float(np.mean(baseline.features[name])),
                "live mean": float(np.mean(live)),
                "KS": float(result.statistic),
                "p": float(result.pvalue),
                "drift": drift,
            }
        )
        if drift:
            report.drifted.append(f"{name} (KS {result.statistic:.2f}, p {result.pvalue:.1e})")


def monitoring_uri(artifact_root: str, endpoint: str, *parts: str) -> str:
    """``<artifact_root>/monitoring/<endpoint>/...``: the cursor, the last verdict and every report."""
    return join_uri(artifact_root, "monitoring", endpoint, *parts)


def read_cursor(storage: Storage, artifact_root: str, endpoint: str) -> dt.datetime | None:
    """The time of the last capture line an earlier monitor run read (None: never monitored)."""
    try:
        return parse_time(
            json.loads(storage.read_bytes(monitoring_uri(artifact_root, endpoint, "cursor.json")))["after"]
        )
    except ObjectNotFoundError:
        return None


def save_report(storage: Storage, artifact_root: str, report: MonitorReport) -> None:
    """Keep ``report`` (and as the endpoint's last verdict); move the cursor past its window (skipped lines
    included: the next run starts after them)."""
    document = json.dumps(report.to_dict(), indent=1).encode()
    stamp = (report.window_end or "empty").replace(":", "")
    storage.write_bytes(monitoring_uri(artifact_root, report.endpoint, "reports", f"{stamp}.json"), document)
    storage.write_bytes(monitoring_uri(artifact_root, report.endpoint, "last.json"), document)
    if report.window_end:
        storage.write_bytes(
            monitoring_uri(artifact_root, report.endpoint, "cursor.json"),
            json.dumps({"after": report.window_end}).encode(),
        )


def last_report(storage: Storage, artifact_root: str, endpoint: str) -> dict[str, Any] | None:
    """The endpoint's last monitor verdict, as saved (None: never monitored)."""
    try:
        return json.loads(storage.read_bytes(monitoring_uri(artifact_root, endpoint, "last.json")))
    except ObjectNotFoundError:
        return None
