"""Learning from production: labelled captured photos, and answers to a labelling queue, join the dataset.

    capture since the harvest's cursor ─► per answered request with its photo kept whole:
        label under labels_uri (by InferenceId) ─► store photo + label in the feedback source ─► lineage
        no label                               ─► a queue candidate, scored by uncertainty (and disagreement)
    ─► a new manifest version (the previous entries + the new ones) ─► the most uncertain candidates, one per
       near-duplicate, up to a budget, into the labelling queue (answered in the Prefect UI or in Label Studio)

Each dataset has its own feedback source under the artifact root, laid out like the ABID bucket, so the data
stage downloads a manifest version from it as from any bucket::

    feedback/{dataset}/bin-images/<id>.jpg, metadata/<id>.json      (``EXPECTED_QUANTITY``)
    feedback/{dataset}/manifests/000001.json                          a manifest version (seed format), written once
    feedback/{dataset}/manifests/000001.lineage.json                  :class:`FeedbackVersion`: what it added, whence
    feedback/{dataset}/cursors/<endpoint>.json                        the harvest's cursor (not the monitor's)
    feedback/{dataset}/queue/items/<id>.json, queue/images/<id>.jpg   the labelling queue (:class:`QueueItem`)
    feedback/{dataset}/queue/answered/<id>.json                       an answered item (its photo joined the source)

A photo from production is named ``fb-<first 32 hex of its sha256>``: never a name a caller chose (an
``InferenceId`` like ``../../x`` is refused, and no id from a request becomes a path), never an original id
(a darker photo of bin ``00710`` is a new image, not a replacement), and the same photo always gets the same
name. A manifest version is complete in itself: the data stage takes one source, so the feedback source holds,
beside the harvested photos, a copy of each original photo a version lists (copied once, only those missing:
the manifest's images, never the rest of the original bucket). The latest version is the highest number whose
lineage exists (:func:`latest_version`); the nightly trains on it with ``source_uri`` = the feedback source.

A photo already in the dataset (the same sha256: in the last ``split.csv``, a manifest version's lineage, or
the queue) is not added again. Plain Python: no Prefect here.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import heapq
import io
import json
import math
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from PIL import Image

from bincount.capture import CaptureReader, CaptureRecord, format_time, parse_time
from bincount.download import check_image
from bincount.ids import PRODUCTION_PHOTO_PREFIX, UnsafeNameError, check_image_id, is_production_photo
from bincount.manifest import (
    CLASSES,
    MAX_METADATA_BYTES,
    Manifest,
    ManifestError,
    dump_manifest,
    expected_quantity,
    image_uri,
    metadata_uri,
    read_manifest,
)
from bincount.monitoring import error_kind
from bincount.split import SPLIT_FILE, read_split
from bincount.storage import ObjectNotFoundError, Storage, TransientStorageError, join_uri

MAX_PHOTO_BYTES = 5_000_000
"""Largest captured photo taken into the dataset (a bin photo is tens of kilobytes)."""
MAX_PHOTOS_PER_RUN = 10_000
"""Most photos one harvest adds; the rest wait for the next run (the cursor stops before them)."""
NEAR_DUPLICATE_BITS = 6
"""Two photos whose 64-bit difference hashes differ in at most this many bits are near-duplicates."""
CANDIDATES_PER_SLOT = 8
"""Queue candidates kept while reading, per slot of the budget (the rest are dropped as they are read)."""
MAX_VERSION_ATTEMPTS = 50
DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_VERSION_FILE = re.compile(r"(\d{6,})\.lineage\.json")


class FeedbackError(ValueError):
    """Feedback cannot be taken as asked; the message says what to change."""


def check_dataset(dataset: str) -> str:
    """Return ``dataset`` if it is a dataset name (as ``DataOptions.dataset``); raises :class:`FeedbackError`."""
    if not DATASET_NAME.fullmatch(dataset):
        raise FeedbackError(f"dataset {dataset!r} is not a dataset name: use lower-case letters, digits, '_' or '-'")
    return dataset


def feedback_uri(artifact_root: str, dataset: str, *parts: str) -> str:
    """``{artifact_root}/feedback/{dataset}/...``: the dataset's feedback source and its records."""
    return join_uri(artifact_root, "feedback", check_dataset(dataset), *parts)


def photo_id(sha256: str) -> str:
    """The image id of a photo from production: ``fb-`` and the first 32 hex digits of its sha256."""
    return f"{PRODUCTION_PHOTO_PREFIX}{sha256[:32]}"


@dataclass(frozen=True)
class Lineage:
    """Where a photo added from production came from."""

    endpoint: str
    model_version: str | None
    capture_file: str
    captured_at: str  # the request's inferenceTime
    inference_id: str | None
    labelled_by: str  # "labels" (under labels_uri), "label-studio" or "prefect-ui" (a queue answer); "" while queued


@dataclass(frozen=True)
class AddedImage:
    """A photo that joined the feedback source with its label."""

    image_id: str
    label: int
    sha256: str
    lineage: Lineage


@dataclass(frozen=True)
class Refusal:
    """A photo not taken, and why (the message names the photo)."""

    photo: str  # the InferenceId as sent (or the queue item), for people
    capture_file: str
    reason: str


@dataclass(frozen=True)
class QueueItem:
    """A photo waiting for a person to count it: the most uncertain the model was, one per near-duplicate."""

    image_id: str
    sha256: str
    dhash: int
    uncertainty: float  # the standard deviation of the answer's count distribution
    disagreement: bool  # another model version answered the same InferenceId with another count
    predicted: int
    lineage: Lineage

    @property
    def score(self) -> tuple[bool, float]:
        return self.disagreement, self.uncertainty


@dataclass
class HarvestResult:
    """What one harvest read and did (plain values: Prefect persists it)."""

    endpoint: str
    dataset: str
    read: int = 0
    added: list[AddedImage] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    duplicates: int = 0
    unlabelled: int = 0
    queued: list[QueueItem] = field(default_factory=list)
    cursor: str | None = None  # the inferenceTime the next harvest starts after
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FeedbackVersion:
    """One version of a dataset's manifest: where it is, what it added (with lineage), and what it copied."""

    dataset: str
    version: int
    manifest_uri: str
    source_uri: str  # the feedback source: every image the manifest lists is there
    created_at: str
    images: int
    previous_manifest_uri: str | None
    base_manifest_uri: str
    added: list[AddedImage]
    mirrored: int  # original photos copied into the feedback source for this version
    not_in_base: list[str]  # originals the manifest lists that the base source lacks (the download lists them too)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FeedbackVersion:
        document = json.loads(data)
        document["added"] = [
            AddedImage(**{**item, "lineage": Lineage(**item["lineage"])}) for item in document["added"]
        ]
        return cls(**document)


# --- scoring -------------------------------------------------------------------------------------------------


def answer_of(record: CaptureRecord) -> tuple[int, dict[int, float]] | None:
    """The predicted count and the count distribution of an answered request (None: no JSON answer with them)."""
    if record.output_encoding != "JSON":
        return None
    try:
        first = json.loads(record.output_data)["predictions"][0]
        probabilities = {int(count): float(p) for count, p in first["probabilities"].items()}
        return int(first["predicted_count"]), probabilities
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def count_spread(probabilities: dict[int, float]) -> float:
    """The standard deviation of the count under ``probabilities`` (0: sure of one count; an ordinal head's
    uncertainty: 2 against 4 is a wider doubt than 2 against 3)."""
    total = sum(probabilities.values())
    if total <= 0 or not all(math.isfinite(p) for p in probabilities.values()):
        return 0.0
    mean = sum(count * p for count, p in probabilities.items()) / total
    return math.sqrt(sum(p * (count - mean) ** 2 for count, p in probabilities.items()) / total)


def difference_hash(data: bytes) -> int:
    """A 64-bit difference hash of a photo (9x8 grey thumbnail, each bit: brighter than its right neighbour)."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (64, 64))
        small = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    pixels = small.tobytes()  # one byte per pixel, row by row
    bits = 0
    for row in range(8):
        for column in range(8):
            bits = (bits << 1) | (pixels[row * 9 + column] > pixels[row * 9 + column + 1])
    return bits


def near_duplicate(first: int, second: int) -> bool:
    return (first ^ second).bit_count() <= NEAR_DUPLICATE_BITS


# --- reading what the dataset holds --------------------------------------------------------------------------


def known_digests(storage: Storage, artifact_root: str, dataset: str) -> set[str]:
    """The sha256 of every photo the dataset holds or asked about: its last ``split.csv``, every manifest
    version's additions, and the labelling queue (a photo there is not queued or added twice)."""
    digests: set[str] = set()
    with contextlib.suppress(ObjectNotFoundError):
        digests.update(read_split(storage, join_uri(artifact_root, "datasets", dataset, SPLIT_FILE))["sha256"])
    for version in versions(storage, artifact_root, dataset):
        digests.update(image.sha256 for image in version.added)
    digests.update(item.sha256 for item in open_queue(storage, artifact_root, dataset))
    return digests


def versions(storage: Storage, artifact_root: str, dataset: str) -> list[FeedbackVersion]:
    """Every complete manifest version of ``dataset`` (its lineage written), oldest first."""
    numbered = {}
    for info in storage.list(feedback_uri(artifact_root, dataset, "manifests")):
        match = _VERSION_FILE.fullmatch(info.uri.rsplit("/", 1)[-1])
        if match:
            numbered[int(match[1])] = info.uri
    return [FeedbackVersion.from_json(storage.read_bytes(uri)) for _, uri in sorted(numbered.items())]


def latest_version(storage: Storage, artifact_root: str, dataset: str) -> FeedbackVersion | None:
    """The dataset's latest manifest version (None: nothing harvested yet): what the nightly trains on."""
    found = versions(storage, artifact_root, dataset)
    return found[-1] if found else None


# --- harvesting ----------------------------------------------------------------------------------------------


def cursor_uri(artifact_root: str, dataset: str, endpoint: str) -> str:
    return feedback_uri(artifact_root, dataset, "cursors", f"{check_image_id(endpoint, 'endpoint name')}.json")


def read_cursor(storage: Storage, artifact_root: str, dataset: str, endpoint: str) -> dt.datetime | None:
    """The time of the last capture line an earlier harvest of ``endpoint`` into ``dataset`` read (None: never)."""
    try:
        return parse_time(json.loads(storage.read_bytes(cursor_uri(artifact_root, dataset, endpoint)))["after"])
    except ObjectNotFoundError:
        return None


def save_cursor(storage: Storage, artifact_root: str, dataset: str, endpoint: str, after: str) -> None:
    storage.write_bytes(cursor_uri(artifact_root, dataset, endpoint), json.dumps({"after": after}).encode())


def _label(storage: Storage, labels_uri: str, inference_id: str) -> int | None:
    """``EXPECTED_QUANTITY`` of ``<labels_uri>/metadata/<id>.json`` (None: no label yet); raises ManifestError
    for a label document without a usable count, UnsafeNameError for an id that is not an image id."""
    uri = metadata_uri(labels_uri, inference_id)
    try:
        return expected_quantity(storage.read_bytes(uri, max_bytes=MAX_METADATA_BYTES), uri)
    except ObjectNotFoundError:
        return None


def store_photo(storage: Storage, source_uri: str, image_id: str, data: bytes, label: int, lineage: Lineage) -> None:
    """Write a photo and its ABID metadata into the feedback source (the photo first: a metadata document
    always has its photo; an id is a digest, so a photo already there is the same photo)."""
    storage.create_new(image_uri(source_uri, image_id), data)
    metadata = {"EXPECTED_QUANTITY": label, "image_fname": f"{image_id}.jpg", "bincount_lineage": asdict(lineage)}
    storage.write_bytes(metadata_uri(source_uri, image_id), json.dumps(metadata).encode())


class _FileTrackingReader(CaptureReader):
    """A capture reader that knows which file the record it just gave came from (for the lineage)."""

    current_file: str | None = None

    def _read_file(self, uri: str, relative: str) -> Iterator[CaptureRecord]:
        self.current_file = uri
        yield from super()._read_file(uri, relative)


class _Candidates:
    """The ``limit`` highest-scored queue candidates seen so far, photos included (a bounded heap)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._heap: list[tuple[tuple[bool, float], int, QueueItem, bytes]] = []
        self._order = 0

    def offer(self, item: QueueItem, data: bytes) -> None:
        if self.limit <= 0:
            return
        self._order += 1
        entry = (item.score, -self._order, item, data)
        if len(self._heap) < self.limit:
            heapq.heappush(self._heap, entry)
        elif entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def best_first(self) -> list[tuple[QueueItem, bytes]]:
        return [(item, data) for _, _, item, data in sorted(self._heap, key=lambda e: e[:2], reverse=True)]


@dataclass
class Harvest:
    """A harvest's inputs: the capture to read, where labels are, where photos go, and the limits."""

    endpoint: str
    dataset: str
    artifact_root: str
    capture_prefix: str
    labels_uri: str | None
    after: dt.datetime | None = None  # the harvest's cursor
    look_back_hours: float = 0.0  # also read again this much before the cursor: labels that arrived since
    classes: tuple[int, ...] = CLASSES
    budget: int = 20
    max_photo_bytes: int = MAX_PHOTO_BYTES
    max_photos: int = MAX_PHOTOS_PER_RUN


def harvest(storage: Storage, labels_storage: Storage, plan: Harvest) -> HarvestResult:
    """Harvest ``plan``'s capture (:func:`read_capture`), then queue up to ``plan.budget`` of the unlabelled
    photos that teach most (:func:`enqueue`). The cursor is the caller's to save, once the additions are
    recorded in a manifest version (a run that fails before reads the same capture again: nothing is lost)."""
    result, candidates = read_capture(storage, labels_storage, plan)
    result.queued = enqueue(storage, plan.artifact_root, plan.dataset, candidates, plan.budget)
    return result


def read_capture(
    storage: Storage, labels_storage: Storage, plan: Harvest
) -> tuple[HarvestResult, list[tuple[QueueItem, bytes]]]:
    """Read ``plan``'s capture after its cursor (and ``look_back_hours`` before it), store each labelled new
    photo in the feedback source, and keep the most uncertain unlabelled ones (``plan.budget`` x
    :data:`CANDIDATES_PER_SLOT`) as queue candidates.

    Only answered requests (2xx) whose photo was kept whole are taken; a photo over ``max_photo_bytes`` or not
    a decodable JPEG/PNG, an ``InferenceId`` that is not an image id, and a label outside ``classes`` are
    refused and listed, naming the photo. Returns the result and the candidates, best first.
    """
    source = feedback_uri(plan.artifact_root, plan.dataset)
    result = HarvestResult(plan.endpoint, plan.dataset)
    known = known_digests(storage, plan.artifact_root, plan.dataset)
    candidates = _Candidates(plan.budget * CANDIDATES_PER_SLOT)
    answers: dict[str, tuple[str | None, int]] = {}  # InferenceId -> (model version, count) first seen
    since = plan.after - dt.timedelta(hours=plan.look_back_hours) if plan.after else None
    reader = _FileTrackingReader(storage, plan.capture_prefix, since)
    last_taken: dt.datetime | None = None
    for record in reader:
        if len(result.added) >= plan.max_photos:
            result.problems.append(f"stopped after {plan.max_photos} photos (max_photos): the next run goes on")
            break
        last_taken = record.at
        result.read += 1
        capture_file = reader.current_file or plan.capture_prefix
        taken = _take(record, capture_file, plan, result)
        if taken is None:
            continue
        data, digest, answer = taken
        if digest in known:
            result.duplicates += 1
            continue
        lineage = Lineage(
            plan.endpoint, record.model_version, capture_file, format_time(record.at), record.inference_id, "labels"
        )
        refused_before = len(result.refused)
        label = _label_or_refuse(labels_storage, plan, record, capture_file, result)
        if len(result.refused) > refused_before:
            continue
        if label is not None:
            image_id = photo_id(digest)
            store_photo(storage, source, image_id, data, label, lineage)
            result.added.append(AddedImage(image_id, label, digest, lineage))
            known.add(digest)
            continue
        result.unlabelled += 1
        if answer is None:
            continue
        predicted, probabilities = answer
        disagreement = False
        if record.inference_id:
            first = answers.setdefault(record.inference_id, (record.model_version, predicted))
            disagreement = first[0] != record.model_version and first[1] != predicted
        item = QueueItem(
            image_id=photo_id(digest),
            sha256=digest,
            dhash=difference_hash(data),
            uncertainty=count_spread(probabilities),
            disagreement=disagreement,
            predicted=predicted,
            lineage=replace(lineage, labelled_by=""),
        )
        candidates.offer(item, data)
    stop = last_taken if len(result.added) >= plan.max_photos else reader.latest
    ends = [at for at in (stop, plan.after) if at is not None]
    result.cursor = format_time(max(ends)) if ends else None  # never back: a look back reads again, no more
    result.problems.extend(reader.problems)
    return result, candidates.best_first()


def _take(
    record: CaptureRecord, capture_file: str, plan: Harvest, result: HarvestResult
) -> tuple[bytes, str, tuple[int, dict[int, float]] | None] | None:
    """The photo of an answered request kept whole, its sha256 and the answer; None (refused where it is the
    photo's fault) otherwise."""
    photo = record.inference_id or f"request at {format_time(record.at)}"
    if error_kind(record) != "ok" or record.input_kept != "inline":
        return None  # not answered, or only a thumbnail was kept: not the photo the model saw
    data = record.image()
    if not data:
        return None
    if len(data) > plan.max_photo_bytes:
        result.refused.append(
            Refusal(photo, capture_file, f"{len(data)} bytes, over max_photo_bytes={plan.max_photo_bytes}")
        )
        return None
    try:
        check_image(data)
    except ValueError as error:
        result.refused.append(Refusal(photo, capture_file, f"the captured photo {error}"))
        return None
    return data, hashlib.sha256(data).hexdigest(), answer_of(record)


def _label_or_refuse(
    labels_storage: Storage, plan: Harvest, record: CaptureRecord, capture_file: str, result: HarvestResult
) -> int | None:
    """The label of a request's InferenceId, or None (no id, no label yet, or refused: listed in ``result.refused``).

    An InferenceId that is not an image id is refused whether or not labels are read: it names no photo."""
    if not record.inference_id:
        return None
    photo = record.inference_id
    try:
        check_image_id(photo, "InferenceId")
    except UnsafeNameError as error:
        result.refused.append(Refusal(photo, capture_file, f"refused: {error}"))
        return None
    if plan.labels_uri is None:
        return None
    try:
        label = _label(labels_storage, plan.labels_uri, photo)
    except ManifestError as error:
        result.refused.append(Refusal(photo, capture_file, f"label unreadable: {error}"))
        return None
    if label is not None and label not in plan.classes:
        result.refused.append(
            Refusal(photo, capture_file, f"label {label} of photo {photo} is outside the classes {list(plan.classes)}")
        )
        return None
    return label


# --- manifest versions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackBase:
    """What a dataset's first manifest version starts from: the manifest the serving model was trained on."""

    dataset: str
    manifest_uri: str
    source_uri: str


def feedback_base(
    recipe: dict[str, Any], source_uri: str, dataset: str | None = None, manifest_uri: str | None = None
) -> FeedbackBase:
    """The dataset, manifest and source a registered version's ``recipe`` names (its ``data`` and ``location``),
    with what is given here winning, and ``source_uri`` (its ``file_list.json``) where neither names one."""
    data, location = recipe.get("data") or {}, recipe.get("location") or {}
    source = location.get("source_uri") or source_uri
    return FeedbackBase(
        dataset=check_dataset(dataset or data.get("dataset") or "abid"),
        manifest_uri=manifest_uri or data.get("manifest_uri") or join_uri(source, "file_list.json"),
        source_uri=source,
    )


def record_version(
    storage: Storage,
    base_storage: Storage,
    artifact_root: str,
    base: FeedbackBase,
    added: list[AddedImage],
    *,
    concurrency: int = 16,
) -> FeedbackVersion | None:
    """Record the next manifest version of ``base.dataset``: the latest version's entries, the base manifest's
    entries it lacks (a grown original manifest), and ``added``; copy the originals it lists that the feedback
    source lacks.

    Written once (create-if-absent, numbered); a run that finds its number taken reads again and decides again.
    Returns None when no photo of ``added`` is new to the latest version (nothing recorded, nothing copied).
    """
    dataset, base_manifest_uri = base.dataset, base.manifest_uri
    source = feedback_uri(artifact_root, dataset)
    for _ in range(MAX_VERSION_ATTEMPTS):
        previous = latest_version(storage, artifact_root, dataset)
        manifest: Manifest = read_manifest(storage, previous.manifest_uri) if previous else {}
        before = dict(manifest)
        for image_id, label in read_manifest(base_storage, base_manifest_uri).items():
            manifest.setdefault(image_id, label)
        new = [image for image in added if image.image_id not in manifest]
        if not new:
            return None
        manifest.update((image.image_id, image.label) for image in new)
        originals = [image_id for image_id in manifest if image_id not in before and not is_production_photo(image_id)]
        mirrored, missing = _mirror(storage, base_storage, base.source_uri, source, originals, concurrency)
        number = max((int(match[1]) for match in _numbers(storage, source)), default=0) + 1
        manifest_uri = join_uri(source, "manifests", f"{number:06d}.json")
        if not storage.create_new(manifest_uri, dump_manifest(manifest)):
            continue
        version = FeedbackVersion(
            dataset=dataset,
            version=number,
            manifest_uri=manifest_uri,
            source_uri=source,
            created_at=format_time(dt.datetime.now(dt.UTC)),
            images=len(manifest),
            previous_manifest_uri=previous.manifest_uri if previous else None,
            base_manifest_uri=base_manifest_uri,
            added=new,
            mirrored=mirrored,
            not_in_base=missing,
        )
        storage.write_bytes(join_uri(source, "manifests", f"{number:06d}.lineage.json"), version.to_json())
        return version
    raise TransientStorageError(
        f"other runs kept recording versions of {join_uri(source, 'manifests')} ({MAX_VERSION_ATTEMPTS} tries): "
        "run the harvest again once they finished"
    )


def _numbers(storage: Storage, source: str) -> Iterable[re.Match[str]]:
    """Every claimed version number (a manifest written, with or without its lineage yet)."""
    for info in storage.list(join_uri(source, "manifests")):
        match = re.fullmatch(r"(\d{6,})\.json", info.uri.rsplit("/", 1)[-1])
        if match:
            yield match


def _mirror(
    storage: Storage, base_storage: Storage, base_source: str, source: str, ids: list[str], concurrency: int
) -> tuple[int, list[str]]:
    """Copy the photos and metadata of ``ids`` that ``source`` lacks from ``base_source``; returns how many were
    copied and the ids the base source lacks."""
    if base_source.rstrip("/") == source.rstrip("/") or not ids:
        return 0, []
    present = {info.uri.rsplit("/", 1)[-1][: -len(".jpg")] for info in storage.list(join_uri(source, "bin-images"))}

    def copy(image_id: str) -> bool:
        try:
            metadata = base_storage.read_bytes(metadata_uri(base_source, image_id), max_bytes=MAX_METADATA_BYTES)
            photo = base_storage.read_bytes(image_uri(base_source, image_id), max_bytes=MAX_PHOTO_BYTES)
        except ObjectNotFoundError:
            return False
        storage.write_bytes(image_uri(source, image_id), photo)
        storage.write_bytes(metadata_uri(source, image_id), metadata)
        return True

    wanted = [image_id for image_id in ids if image_id not in present]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        copied = dict(zip(wanted, pool.map(copy, wanted), strict=True))
    return sum(copied.values()), sorted(image_id for image_id, ok in copied.items() if not ok)


# --- the labelling queue -------------------------------------------------------------------------------------


def open_queue(storage: Storage, artifact_root: str, dataset: str) -> list[QueueItem]:
    """The queue's items not answered yet, most uncertain first."""
    answered = {
        info.uri.rsplit("/", 1)[-1] for info in storage.list(feedback_uri(artifact_root, dataset, "queue", "answered"))
    }
    items = []
    for info in storage.list(feedback_uri(artifact_root, dataset, "queue", "items")):
        if info.uri.rsplit("/", 1)[-1] in answered:
            continue
        document = json.loads(storage.read_bytes(info.uri))
        items.append(QueueItem(**{**document, "lineage": Lineage(**document["lineage"])}))
    return sorted(items, key=lambda item: item.score, reverse=True)


def enqueue(
    storage: Storage, artifact_root: str, dataset: str, candidates: list[tuple[QueueItem, bytes]], budget: int
) -> list[QueueItem]:
    """Put up to ``budget`` of ``candidates`` (best first) in the queue, skipping a near-duplicate of one
    already chosen or waiting in the queue; returns those queued."""
    waiting = [item.dhash for item in open_queue(storage, artifact_root, dataset)]
    chosen: list[QueueItem] = []
    for item, data in candidates:
        if len(chosen) >= budget:
            break
        if any(near_duplicate(item.dhash, other) for other in waiting):
            continue
        storage.create_new(feedback_uri(artifact_root, dataset, "queue", "images", f"{item.image_id}.jpg"), data)
        storage.write_bytes(
            feedback_uri(artifact_root, dataset, "queue", "items", f"{item.image_id}.json"),
            json.dumps(asdict(item)).encode(),
        )
        waiting.append(item.dhash)
        chosen.append(item)
    return chosen


def queue_photo(storage: Storage, artifact_root: str, dataset: str, image_id: str) -> bytes:
    return storage.read_bytes(
        feedback_uri(artifact_root, dataset, "queue", "images", f"{check_image_id(image_id, 'queue item')}.jpg")
    )


def thumbnail(photo: bytes, px: int) -> bytes:
    """A JPEG of ``photo`` at most ``px`` a side (to show many photos in one page)."""
    with Image.open(io.BytesIO(photo)) as image:
        image.draft("RGB", (px, px))
        small = image.convert("RGB")
    small.thumbnail((px, px))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def data_uri(photo: bytes) -> str:
    """A photo as a ``data:image/jpeg;base64,...`` URI: shown inline with no server behind it."""
    return "data:image/jpeg;base64," + base64.b64encode(photo).decode()


@dataclass(frozen=True)
class Answer:
    """A person's count for a queue item."""

    image_id: str
    count: int
    labelled_by: str  # "label-studio" or "prefect-ui"


def answer_queue(
    storage: Storage, artifact_root: str, dataset: str, answers: list[Answer], classes: tuple[int, ...] = CLASSES
) -> tuple[list[AddedImage], list[Refusal]]:
    """Move each answered item's photo, with its count, into the feedback source and mark the item answered.

    An answer for an item that is not waiting in the queue, or with a count outside ``classes``, is refused
    (naming the photo) and the item stays in the queue.
    """
    waiting = {item.image_id: item for item in open_queue(storage, artifact_root, dataset)}
    source = feedback_uri(artifact_root, dataset)
    added, refused = [], []
    for answer in answers:
        item = waiting.get(answer.image_id)
        if item is None:
            refused.append(Refusal(answer.image_id, "-", "no such photo waits in the labelling queue"))
            continue
        if answer.count not in classes:
            refused.append(
                Refusal(
                    answer.image_id,
                    item.lineage.capture_file,
                    f"count {answer.count} for photo {answer.image_id} is outside the classes {list(classes)}",
                )
            )
            continue
        lineage = replace(item.lineage, labelled_by=answer.labelled_by)
        photo = queue_photo(storage, artifact_root, dataset, item.image_id)
        store_photo(storage, source, item.image_id, photo, answer.count, lineage)
        storage.write_bytes(
            feedback_uri(artifact_root, dataset, "queue", "answered", f"{item.image_id}.json"),
            json.dumps(asdict(answer)).encode(),
        )
        added.append(AddedImage(item.image_id, answer.count, item.sha256, lineage))
        del waiting[answer.image_id]
    return added, refused


# --- Label Studio --------------------------------------------------------------------------------------------

LABEL_STUDIO_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="count" toName="image" choice="single" required="true">
{choices}
  </Choices>
</View>"""


def label_studio_config(classes: tuple[int, ...] = CLASSES) -> str:
    """The labelling interface for the exported tasks: one choice per count."""
    return LABEL_STUDIO_CONFIG.format(choices="\n".join(f'    <Choice value="{count}"/>' for count in classes))


def label_studio_tasks(storage: Storage, artifact_root: str, dataset: str) -> list[dict[str, Any]]:
    """The open queue as Label Studio tasks (its import format): ``{"id", "data": {"image": <data URI>,
    "item": <queue item id>, ...}}``; ``data.item`` comes back in Label Studio's export (it renumbers ``id``)."""
    return [
        {
            "id": number,
            "data": {
                "image": data_uri(queue_photo(storage, artifact_root, dataset, item.image_id)),
                "item": item.image_id,
                "predicted": item.predicted,
                "uncertainty": round(item.uncertainty, 4),
            },
        }
        for number, item in enumerate(open_queue(storage, artifact_root, dataset), start=1)
    ]


def parse_label_studio_export(data: bytes, name: str = "Label Studio export") -> tuple[list[Answer], list[Refusal]]:
    """The answers in Label Studio's JSON export (a list of tasks with ``annotations[].result[]``): per task, the
    last annotation not cancelled; its ``choices`` (``value.choices[0]``) or ``number`` (``value.number``) result.

    A task without ``data.item``, or whose answer is not a whole number, is refused and listed; a task nobody
    answered is left out (it stays in the queue).

    Raises:
        FeedbackError: the file is not a JSON list of tasks.
    """
    try:
        tasks = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise FeedbackError(f"{name} is not JSON ({error}): export the project as JSON from Label Studio") from None
    if not isinstance(tasks, list):
        raise FeedbackError(f"{name} is not a list of tasks: export the project as JSON (not JSON-MIN or CSV)")
    answers, refused = [], []
    for position, task in enumerate(tasks):
        where = f"{name}[{position}]"
        item = task.get("data", {}).get("item") if isinstance(task, dict) else None
        if not isinstance(item, str):
            refused.append(Refusal(where, name, "no data.item: not a task this project exported"))
            continue
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        values = [
            result.get("value", {})
            for annotation in annotations[-1:]
            for result in annotation.get("result") or []
            if result.get("type") in ("choices", "number")
        ]
        if not values:
            continue
        value = values[0]
        raw = value["choices"][0] if value.get("choices") else value.get("number")
        try:
            count = int(str(raw))
        except ValueError:
            refused.append(Refusal(item, name, f"answer {raw!r} for photo {item} is not a whole count"))
            continue
        answers.append(Answer(item, count, "label-studio"))
    return answers, refused
