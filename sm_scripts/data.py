"""Channels as tensors: every image decoded and resized once into a uint8 cache, batches sliced from it.

A channel is an ImageFolder-style tree (``<root>/<count>/<id>.jpg``). :func:`load_channel` turns one
into an :class:`ImageCache` through :mod:`sm_scripts.preprocessing` (the endpoint's path too), and
:func:`batches` yields augmented, normalized, channels_last float batches from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sm_scripts.errors import TrainingError
from sm_scripts.preprocessing import IMAGE_SUFFIXES, ImageError, load_image, normalize


class ImageCache:
    """A channel's images decoded and resized once: ``images`` (N, 3, S, S) uint8, ``labels`` (N,).

    After :func:`sm_scripts.loop.backbone_features`, ``images`` holds (N, F) float features instead.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, files: list[str]) -> None:
        self.images, self.labels, self.files = images, labels, files

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(caches: list[ImageCache]) -> ImageCache:
        return ImageCache(
            torch.cat([c.images for c in caches]),
            torch.cat([c.labels for c in caches]),
            [f for c in caches for f in c.files],
        )


def find_classes(root: Path) -> list[str]:
    """Class folders of an ImageFolder-style channel, in numeric order (``1`` .. ``5``)."""
    if not root.is_dir():
        raise TrainingError(f"channel folder {root} does not exist: check the SM_CHANNEL_* variable")
    names = [p.name for p in root.iterdir() if p.is_dir()]
    if not names:
        raise TrainingError(f"channel {root} has no class folders: expected {root}/<count>/<id>.jpg")
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


def channel_files(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """The image files under ``root/<class>/`` in order, with their class indexes."""
    extra = sorted({p.name for p in root.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise TrainingError(f"channel {root} has class folders {extra} that the train channel lacks ({classes})")
    files, labels = [], []
    for index, name in enumerate(classes):
        folder = root / name
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        files += found
        labels += [index] * len(found)
    if not files:
        raise TrainingError(f"channel {root} holds no images (.jpg, .jpeg, .png) under its class folders")
    return files, labels


def load_channel(root: Path, classes: list[str], image_size: int, threads: int) -> ImageCache:
    """Decode and resize every image under ``root/<class>/`` once, in parallel threads."""
    files, labels = channel_files(root, classes)

    def load(path: Path) -> torch.Tensor:
        try:
            return load_image(path.read_bytes(), image_size)
        except ImageError as error:
            raise TrainingError(f"cannot decode image {path}: {error}") from error

    images = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for index, image in enumerate(pool.map(load, files)):
            images[index] = image
    return ImageCache(images, torch.tensor(labels, dtype=torch.long), [str(p) for p in files])


def square_symmetries(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each square image vertically and transpose it, each with probability 1/2 (after a horizontal
    flip, that draws each of the square's eight symmetries with equal chance)."""
    n = images.shape[0]
    vertical, transpose = (torch.rand(2, n, generator=generator) < 0.5).to(images.device)[:, :, None, None, None]
    images = torch.where(vertical, images.flip(-2), images)
    return torch.where(transpose, images.transpose(-1, -2), images)


def shift_and_brighten(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift the batch by up to 1/16 of its size (edges replicated) and scale each image's brightness by 0.8-1.2."""
    n, size = images.shape[0], images.shape[-1]
    pad = max(1, size // 16)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    images = padded[..., dy : dy + size, dx : dx + size]
    scale = (0.8 + 0.4 * torch.rand(n, generator=generator)).to(images.device)[:, None, None, None]
    return (images.float() * scale).clamp_(0, 255).to(torch.uint8)


def augment(images: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Augment a uint8 batch on the tensor: ``flip`` (horizontal), ``standard`` (flip, shift, brightness),
    ``strong`` (standard, plus vertical flips and transposes: with them every one of the square's eight
    symmetries; a bin photographed from above holds as many items whichever way it is turned)."""
    if mode == "none":
        return images
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
    if mode == "strong":
        images = square_symmetries(images, generator)
    if mode in ("standard", "strong"):
        images = shift_and_brighten(images, generator)
    return images


def batches(
    cache: ImageCache,
    batch_size: int,
    device: torch.device,
    mean: torch.Tensor,
    std: torch.Tensor,
    shuffle: bool,
    augmentation: str = "none",
    generator: torch.Generator | None = None,
    min_batch: int = 1,
    order: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized float batches (channels_last) from the uint8 cache, shuffled with ``generator``, or
    taken in ``order`` (the indexes of a data-parallel process's shard) when given.

    A last batch smaller than ``min_batch`` is left out (batch norm cannot train on one image).
    """
    if order is None:
        order = torch.randperm(len(cache), generator=generator) if shuffle else torch.arange(len(cache))
    for start in range(0, len(order), batch_size):
        if len(order) - start < min_batch:
            break
        index = order[start : start + batch_size].to(cache.images.device)
        if cache.images.dim() == 2:  # cached backbone features: nothing to augment or normalize
            yield cache.images.index_select(0, index).to(device), cache.labels.index_select(0, index.cpu()).to(device)
            continue
        images = cache.images.index_select(0, index)
        if augmentation != "none":
            images = augment(images, augmentation, generator)
        images = normalize(images.to(device, non_blocking=True), mean, std)
        yield images, cache.labels.index_select(0, index.to(cache.labels.device)).to(device, non_blocking=True)
