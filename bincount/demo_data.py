"""Offline demo data: synthetic bin photos laid out like the ABID bucket, deterministic by seed.

Each photo is a cardboard-coloured bin with a few elastic straps across it and 0-7 items
(boxes and pouches of random colour, size and position, some overlapping). The manifest lists
the 1-5 item photos only, as the seeds' ``file_list.json`` does; the others exist in the bucket
so that building a manifest from ids has something to leave out.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from bincount.manifest import CLASSES, dump_manifest, image_uri, metadata_uri
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
    child_seeds = rng.spawn(images)

    def write(index: int) -> None:
        image_rng = child_seeds[index]
        image_id, count = ids[index], int(counts[index])
        storage.write_bytes(image_uri(bucket_uri, image_id), jpeg_bytes(render_bin_image(count, image_rng, size)))
        storage.write_bytes(
            metadata_uri(bucket_uri, image_id), json.dumps(_metadata(image_id, count, image_rng)).encode()
        )

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(write, range(images)))
    manifest = {image_id: int(count) for image_id, count in zip(ids, counts) if count in CLASSES}
    manifest_uri = join_uri(bucket_uri, "file_list.json")
    storage.write_bytes(manifest_uri, dump_manifest(manifest))
    return manifest_uri


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
