"""Offline demo data: synthetic bin photos laid out like the ABID bucket, deterministic by seed.

Each photo is a cardboard-coloured bin with a few elastic straps across it and 0-7 items
(boxes and pouches of random colour, size and position, some overlapping). The manifest lists
the 1-5 item photos only, as the seeds' ``file_list.json`` does; the others exist in the bucket
so that building a manifest from ids has something to leave out. :func:`add_demo_images` grows a
bucket with new photos under new ids (new data for the nightly to find), leaving the others as they are.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from bincount.manifest import CLASSES, dump_manifest, image_uri, metadata_uri, parse_manifest
from bincount.storage import Storage, join_uri

DEMO_SPLITS = ("train", "valid", "test")


def render_bin_image(count: int, rng: np.random.Generator, size: int = 224) -> Image.Image:
    """A synthetic bin photo with ``count`` items."""
    base = np.array([180, 150, 110]) + rng.integers(-30, 30, size=3)
    pixels = np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):  # elastic straps across the bin front
        y = int(rng.integers(0, size))
        draw.line(
            [(0, y), (size, y + int(rng.integers(-size // 8, size // 8)))], fill=(40, 40, 45), width=max(1, size // 40)
        )
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(size // 7, size // 3, size=2))
        left, top = int(rng.integers(0, size - width)), int(rng.integers(0, size - height))
        colour = tuple(int(c) for c in rng.integers(20, 256, size=3))
        outline = tuple(max(0, c - 70) for c in colour)
        box = [left, top, left + width, top + height]
        if rng.random() < 0.5:
            draw.rectangle(box, fill=colour, outline=outline, width=max(1, size // 75))
        else:
            draw.ellipse(box, fill=colour, outline=outline, width=max(1, size // 75))
    return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.0))))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def shift_photo(data: bytes, brightness: float = 0.4, quality: int = 25) -> bytes:
    """A photo as a new camera would see it: darker (``brightness`` times as bright) and recompressed harder
    (JPEG ``quality``): the drift the feedback demonstration and benchmark send."""
    with Image.open(io.BytesIO(data)) as image:
        darker = ImageEnhance.Brightness(image.convert("RGB")).enhance(brightness)
    return jpeg_bytes(darker, quality=quality)


def shifted_demo_photos(
    images: int, seed: int, size: int = 224, brightness: float = 0.4, quality: int = 25
) -> list[tuple[int, bytes]]:
    """``images`` new synthetic photos (counts 1-5, drawn evenly) made darker and recompressed: ``(count, jpeg)``."""
    rng = np.random.default_rng([seed, 7919])
    counts = [int(c) for c in rng.choice(CLASSES, size=images)]
    return [
        (count, shift_photo(jpeg_bytes(render_bin_image(count, child, size)), brightness, quality))
        for count, child in zip(counts, rng.spawn(images), strict=True)
    ]


def _metadata(image_id: str, count: int, rng: np.random.Generator) -> dict:
    skus, remaining = {}, count
    while remaining:
        quantity = int(rng.integers(1, remaining + 1))
        asin = "B0" + "".join(rng.choice(list("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"), size=8))
        skus[asin] = {"asin": asin, "name": f"demo item {asin}", "quantity": quantity}
        remaining -= quantity
    return {"BIN_FCSKU_DATA": skus, "EXPECTED_QUANTITY": count, "image_fname": f"{image_id}.jpg"}


def generate_demo_bucket(
    storage: Storage,
    bucket_uri: str,
    images: int = 600,
    seed: int = 0,
    size: int = 224,
    concurrency: int = 16,
) -> str:
    """Write an ABID-like bucket of ``images`` photos at ``bucket_uri``; return its manifest URI.

    About one photo in twenty has a count outside 1-5 and is left out of the manifest.
    """
    rng = np.random.default_rng(seed)
    counts = rng.choice([0, *CLASSES, 6, 7], size=images, p=[0.02, *([0.96 / len(CLASSES)] * len(CLASSES)), 0.01, 0.01])
    ids = [f"{number:05d}" for number in range(1, images + 1)]
    _write_photos(storage, bucket_uri, dict(zip(ids, (int(c) for c in counts), strict=True)), rng, size, concurrency)
    manifest = {image_id: int(count) for image_id, count in zip(ids, counts, strict=True) if count in CLASSES}
    manifest_uri = join_uri(bucket_uri, "file_list.json")
    storage.write_bytes(manifest_uri, dump_manifest(manifest))
    return manifest_uri


class DemoBucketError(ValueError):
    """The demo bucket cannot be grown as asked; the message says what to do."""


@dataclass(frozen=True)
class AddedImages:
    """What :func:`add_demo_images` wrote: the new ids (in order) and the manifest that lists them."""

    manifest_uri: str
    ids: list[str]
    manifest_size: int


def add_demo_images(
    storage: Storage, bucket_uri: str, images: int, seed: int = 0, concurrency: int = 16
) -> AddedImages:
    """Add ``images`` new photos (counts 1-5, so the manifest lists each) to the demo bucket at ``bucket_uri``.

    The new ids follow the highest id in the bucket, so no object is overwritten; the photos are the size
    of the bucket's first one, and depend on ``seed`` and the first new id (each batch differs).

    Raises:
        DemoBucketError: no manifest at ``bucket_uri`` (make the bucket first), a bucket whose ids are
            not the demo's numbers, or ``images`` below 1.
    """
    manifest_uri = join_uri(bucket_uri, "file_list.json")
    if images < 1:
        raise DemoBucketError(f"cannot add {images} photos: give a number of 1 or more")
    if not storage.exists(manifest_uri):
        raise DemoBucketError(
            f"no demo bucket at {bucket_uri} (no file_list.json): make one first with `bincount make-demo-data "
            f"{bucket_uri}`"
        )
    manifest = parse_manifest(storage.read_bytes(manifest_uri), manifest_uri)
    existing = sorted(info.uri for info in storage.list(join_uri(bucket_uri, "bin-images")))
    numbers = [Path(uri).stem for uri in existing]
    if not all(number.isdigit() for number in numbers):
        raise DemoBucketError(f"{bucket_uri} holds photos whose ids are not numbers: not a demo bucket to grow")
    first = max((int(number) for number in numbers), default=0) + 1
    size = Image.open(io.BytesIO(storage.read_bytes(existing[0]))).width if existing else 224
    rng = np.random.default_rng([seed, first])
    ids = [f"{number:05d}" for number in range(first, first + images)]
    added = dict(zip(ids, (int(c) for c in rng.choice(CLASSES, size=images)), strict=True))
    _write_photos(storage, bucket_uri, added, rng, size, concurrency)
    manifest.update(added)
    storage.write_bytes(manifest_uri, dump_manifest(manifest))
    return AddedImages(manifest_uri=manifest_uri, ids=ids, manifest_size=len(manifest))


def _write_photos(
    storage: Storage, bucket_uri: str, counts: dict[str, int], rng: np.random.Generator, size: int, concurrency: int
) -> None:
    """Render and write a photo and its metadata for each ``id: count``, each from its own child of ``rng``."""
    child_seeds = dict(zip(counts, rng.spawn(len(counts)), strict=True))

    def write(image_id: str) -> None:
        image_rng, count = child_seeds[image_id], counts[image_id]
        storage.write_bytes(image_uri(bucket_uri, image_id), jpeg_bytes(render_bin_image(count, image_rng, size)))
        storage.write_bytes(
            metadata_uri(bucket_uri, image_id), json.dumps(_metadata(image_id, count, image_rng)).encode()
        )

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(write, counts))


def write_demo_channels(root: Path, per_class: int = 8, size: int = 64, seed: int = 0) -> dict[str, Path]:
    """Channel folders (``<split>/<count>/<id>.jpg``) for tests of training and serving."""
    rng = np.random.default_rng(seed)
    channels = {}
    for split in DEMO_SPLITS:
        channels[split] = root / split
        for count in CLASSES:
            folder = channels[split] / str(count)
            folder.mkdir(parents=True, exist_ok=True)
            for number in range(per_class):
                image = render_bin_image(count, rng, size)
                (folder / f"{split}-{count}-{number:04d}.jpg").write_bytes(jpeg_bytes(image))
    return channels
