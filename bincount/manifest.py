"""Manifests: which image ids to use and their counts.

The seed format (``file_list.json``) maps a count to the metadata paths of its images::

    {"1": ["data/metadata/00710.json", ...], "2": [...], ..., "5": [...]}

In memory a manifest is a ``dict[str, int]`` from image id (``"00710"``) to count, in file order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bincount.ids import IMAGE_ID, UnsafeNameError, check_image_id
from bincount.storage import ObjectNotFoundError, ObjectTooLargeError, Storage, join_uri

CLASSES: tuple[int, ...] = (1, 2, 3, 4, 5)
"""The counts the model predicts (the classic 10k subset of ABID)."""

MAX_METADATA_BYTES = 1_000_000
"""Largest metadata document read when labelling ids (ABID's are a few kilobytes)."""

_METADATA_PATH = re.compile(r"(?:data/)?metadata/(?P<id>[^/]+)\.json")

Manifest = dict[str, int]


class ManifestError(ValueError):
    """A manifest cannot be used; the message names the offending entry."""


def image_uri(source_uri: str, image_id: str) -> str:
    return join_uri(source_uri, "bin-images", f"{check_image_id(image_id)}.jpg")


def metadata_uri(source_uri: str, image_id: str) -> str:
    return join_uri(source_uri, "metadata", f"{check_image_id(image_id)}.json")


def parse_manifest(text: str | bytes, name: str = "manifest", classes: Iterable[int] = CLASSES) -> Manifest:
    """Read a seed-format manifest, checking every entry.

    Raises:
        ManifestError: for bad JSON, a count outside ``classes``, an entry that is not a
            ``data/metadata/<id>.json`` path, or an id listed twice (naming both places).
    """
    allowed = {str(count) for count in classes}
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(
            f'{name} is not valid JSON ({error}); expected {{"1": ["data/metadata/<id>.json", ...]}}'
        ) from None
    if not isinstance(document, dict):
        raise ManifestError(
            f"{name} must be a JSON object from count to a list of metadata paths, not {type(document).__name__}"
        )
    manifest: Manifest = {}
    where: dict[str, str] = {}
    for key, paths in document.items():
        if key not in allowed:
            raise ManifestError(f"{name}: class key {key!r} is not one of {sorted(allowed, key=int)}")
        if not isinstance(paths, list):
            raise ManifestError(f"{name}[{key!r}] must be a list of metadata paths, not {type(paths).__name__}")
        for position, path in enumerate(paths):
            entry = f"{name}[{key!r}][{position}]"
            image_id = _metadata_path_id(path, entry)
            if image_id in manifest:
                raise ManifestError(f"{entry}: id {image_id} is listed twice (also at {where[image_id]})")
            manifest[image_id] = int(key)
            where[image_id] = entry
    if not manifest:
        raise ManifestError(f"{name} lists no images")
    return manifest


def _metadata_path_id(path: object, entry: str) -> str:
    """The image id of a manifest entry ``data/metadata/<id>.json``; raises :class:`ManifestError`."""
    match = _METADATA_PATH.fullmatch(path) if isinstance(path, str) else None
    if match is None:
        raise ManifestError(f"{entry} = {path!r} is not a path like 'data/metadata/<id>.json'")
    try:
        return check_image_id(match["id"], entry)
    except UnsafeNameError as error:
        raise ManifestError(str(error)) from None


def dump_manifest(manifest: Manifest) -> bytes:
    """Write ``manifest`` in the seed format (classes in ascending order)."""
    by_count: dict[str, list[str]] = {}
    for image_id, count in manifest.items():
        by_count.setdefault(str(count), []).append(f"data/metadata/{image_id}.json")
    return json.dumps(dict(sorted(by_count.items(), key=lambda item: int(item[0]))), indent=1).encode()


def read_manifest(storage: Storage, uri: str, classes: Iterable[int] = CLASSES) -> Manifest:
    """Fetch and parse the manifest at ``uri``."""
    try:
        text = storage.read_bytes(uri)
    except ObjectNotFoundError:
        raise ManifestError(f"no manifest at {uri}: check the URI, or build one from ids with build_manifest") from None
    return parse_manifest(text, name=uri, classes=classes)


@dataclass
class BuiltManifest:
    """A manifest built from ids, and the ids left out (with why)."""

    manifest: Manifest
    left_out: dict[str, str] = field(default_factory=dict)


def expected_quantity(metadata: bytes, name: str) -> int:
    """The count label (``EXPECTED_QUANTITY``) of one ABID metadata document."""
    try:
        value = json.loads(metadata)["EXPECTED_QUANTITY"]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
        raise ManifestError(f"{name} has no EXPECTED_QUANTITY") from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ManifestError(f"{name}: EXPECTED_QUANTITY is {value!r}, not an integer")
    return value


def build_manifest(
    storage: Storage,
    source_uri: str,
    image_ids: Iterable[str],
    classes: Iterable[int] = CLASSES,
    concurrency: int = 32,
    max_metadata_bytes: int = MAX_METADATA_BYTES,
) -> BuiltManifest:
    """Label ids from their metadata's ``EXPECTED_QUANTITY``; ids without usable metadata (missing, over
    ``max_metadata_bytes``, no count) or with a count outside ``classes`` are left out and listed.

    Raises:
        ManifestError: some ids are not image ids (``../x``, ``a/b``): nothing is fetched.
    """
    allowed = set(classes)
    ids = list(dict.fromkeys(image_ids))
    bad = [
        f"image_ids[{position}] = {image_id!r}"
        for position, image_id in enumerate(ids)
        if not (isinstance(image_id, str) and IMAGE_ID.fullmatch(image_id))
    ]
    if bad:
        raise ManifestError(
            f"{len(bad)} of {len(ids)} ids are not image ids ({'; '.join(bad[:5])}): an id is 1-128 letters, "
            "digits, '_' or '-' (like '00710'); fix the id file or image_ids"
        )

    def label(image_id: str) -> tuple[str, int | str]:
        uri = metadata_uri(source_uri, image_id)
        try:
            return image_id, expected_quantity(storage.read_bytes(uri, max_bytes=max_metadata_bytes), uri)
        except (ObjectNotFoundError, ObjectTooLargeError, ManifestError) as error:
            return image_id, str(error)

    built = BuiltManifest(manifest={})
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for image_id, outcome in pool.map(label, ids):
            if isinstance(outcome, str):
                built.left_out[image_id] = outcome
            elif outcome not in allowed:
                built.left_out[image_id] = f"count {outcome} is outside {sorted(allowed)}"
            else:
                built.manifest[image_id] = outcome
    return built
