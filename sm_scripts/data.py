"""Channels as tensors: every image decoded and resized once into a uint8 cache, batches sliced from it.

A channel is an ImageFolder-style tree (``<root>/<count>/<id>.jpg``). :func:`load_channel` decodes it
through :mod:`sm_scripts.preprocessing` (the endpoint's path too) into a memory-mapped cache file
(:mod:`sm_scripts.image_cache`), and :func:`batches` yields augmented, normalized, channels_last float
batches from it. Resident memory stays flat in the number of images: the pixels live in the file
and the page cache, and only the pages of the batch in flight are mapped into the process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from sm_scripts.errors import TrainingError
from sm_scripts.image_cache import MappedImages, open_cache, open_private
from sm_scripts.preprocessing import IMAGE_SUFFIXES, normalize

COPY_BYTES = 32 << 20  # copied onto a device at a time


class ImageCache:
    """A channel's images decoded and resized once, with their labels (N,) and files.

    The images are ``parts``, one (n, 3, S, S) uint8 tensor per channel, read as one sequence in order:
    each over a memory-mapped cache file (``mapped``), or in memory (on the GPU after :meth:`to`, or
    made by the caller). After :func:`sm_scripts.loop.backbone_features`, one (N, F) float part of
    features instead.
    """

    def __init__(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        labels: torch.Tensor,
        files: list[str],
        mapped: Sequence[MappedImages] = (),
    ) -> None:
        self.parts = [images] if isinstance(images, torch.Tensor) else list(images)
        self.labels, self.files, self.mapped = labels, files, list(mapped)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    @staticmethod
    def concat(caches: list[ImageCache]) -> ImageCache:
        return ImageCache(
            [part for c in caches for part in c.parts],
            torch.cat([c.labels for c in caches]),
            [f for c in caches for f in c.files],
            [m for c in caches for m in c.mapped],
        )

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The images at ``index`` (a CPU tensor of positions), gathered where the parts lie; the files' pages
        are released after each gather (the kernel maps far more than the rows read: its read-around and
        fault-around fill in neighbours, which would otherwise stay mapped)."""
        if len(self.parts) == 1:
            rows = self.parts[0].index_select(0, index.to(self.parts[0].device))
        else:
            first = self.parts[0]
            rows = first.new_empty((len(index), *first.shape[1:]))
            start = 0
            for part in self.parts:
                inside = ((index >= start) & (index < start + len(part))).nonzero().squeeze(1)
                rows[inside.to(rows.device)] = part.index_select(0, (index[inside] - start).to(part.device))
                start += len(part)
        self.release()
        return rows

    def release(self) -> None:
        """Unmap the cache files' pages from this process (see :meth:`MappedImages.release`)."""
        for mapped in self.mapped:
            mapped.release()

    def to(self, device: torch.device) -> None:
        """Copy the images onto ``device`` a chunk at a time (resident memory stays flat), leaving the files."""
        moved = []
        for part in self.parts:
            on_device = torch.empty_like(part, device=device)
            step = max(1, COPY_BYTES // max(1, part[:1].nbytes))
            for start in range(0, len(part), step):
                on_device[start : start + step].copy_(part[start : start + step])
                self.release()
            moved.append(on_device)
        self.parts, self.mapped = moved, []


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
    paths, labels = channel_paths(root, classes)
    return [Path(path) for path in paths], labels


def channel_paths(root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """:func:`channel_files` as strings: a ``Path`` costs about a kilobyte, which adds up over a million images."""
    extra = sorted({p.name for p in root.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise TrainingError(f"channel {root} has class folders {extra} that the train channel lacks ({classes})")
    paths: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue  # a count this channel lacks
        with os.scandir(folder) as entries:
            found = sorted(entry.path for entry in entries if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES)
        paths += found
        labels += [index] * len(found)
    if not paths:
        raise TrainingError(f"channel {root} holds no images (.jpg, .jpeg, .png) under its class folders")
    return paths, labels


def load_channel(
    root: Path, classes: list[str], image_size: int, threads: int, cache_dir: Path | None = None
) -> ImageCache:
    """The images under ``root/<class>/``, decoded and resized once (in parallel threads) into a cache file.

    With ``cache_dir`` the file is kept there, and a later open (another run, another data-parallel
    process) reuses it while the channel is unchanged; without, it is a private temporary file, gone
    with the returned cache.
    """
    files, labels = channel_paths(root, classes)
    if cache_dir is None:
        mapped = open_private(files, labels, image_size, threads)
    else:
        mapped = open_cache(root, files, labels, classes, image_size, threads=threads, cache_dir=cache_dir)
    return ImageCache(mapped.images, mapped.labels, files, [mapped])


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
    *,
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
        index = order[start : start + batch_size]
        rows = cache.take(index)
        labels = cache.labels.index_select(0, index).to(device, non_blocking=True)
        if rows.dim() == 2:  # cached backbone features: nothing to augment or normalize
            yield rows.to(device), labels
            continue
        images = rows.to(device, non_blocking=True)
        if augmentation != "none":
            images = augment(images, augmentation, generator)
        yield normalize(images, mean, std), labels
