"""The one way a photo becomes model input: training, evaluation, batch transform and the endpoint.

    bytes --decode_image--> uint8 [3, H, W] RGB --resize--> uint8 [3, S, S] --normalize (a batch)--> float [N, 3, S, S]

Pixels come from torchvision's decoders (libjpeg-turbo, libpng) and its antialiased bilinear resize
on uint8 tensors; normalization is ``(x / 255 - mean) / std`` in float32, channels_last. Training
caches the resized uint8 images and normalizes each batch; serving decodes and resizes per request
(on the host's decoding threads: for one image neither step starts torch worker threads) and
normalizes the whole batch just before the forward pass. Same bytes, same tensor, on both sides.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _decode_pixels
from torchvision.transforms.v2 import functional as TF

IMAGE_FORMATS = ("JPEG", "PNG")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MAX_IMAGE_PIXELS = 16_000_000  # far above any bin photo; stops decompression bombs before decoding


class ImageError(ValueError):
    """The bytes are not a complete JPEG or PNG image of a sensible size; the message says which."""


class TooManyPixelsError(ImageError):
    """The image would decode to more pixels than the budget it was given."""


def _check_header(data: bytes, pixel_budget: int | None) -> None:
    """Refuse anything but a JPEG or PNG header, images over ``MAX_IMAGE_PIXELS``, and over ``pixel_budget``.

    PIL reads the header only (format and size, no pixels): torchvision decodes GIF and WebP too,
    and would allocate a bomb's pixels before any check could see its size.
    """
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
    except Image.UnidentifiedImageError:
        raise ImageError("the image is not a JPEG or PNG: its first bytes match neither format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"the image is not a readable JPEG or PNG ({error})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"the image is {width}x{height}: at most {MAX_IMAGE_PIXELS} pixels")
    if pixel_budget is not None and width * height > pixel_budget:
        raise TooManyPixelsError(f"{width}x{height} pixels, {pixel_budget} left")


def decode_image(data: bytes | bytearray, pixel_budget: int | None = None) -> torch.Tensor:
    """JPEG or PNG bytes -> uint8 RGB pixels [3, H, W] (grey, palette and alpha images converted).

    ``pixel_budget`` caps the decoded size (checked from the header, before any pixel is decoded).

    Raises:
        TooManyPixelsError: the image would pass ``pixel_budget``.
        ImageError: empty, another format, too large, truncated or corrupt.
    """
    if not data:
        raise ImageError("the image is empty: send the bytes of a JPEG or PNG image")
    _check_header(bytes(data), pixel_budget)
    try:
        image = _decode_pixels(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        reason = str(error).rsplit(", ", 1)[-1]  # torchvision prefixes its C++ source location
        raise ImageError(f"the image is not a readable JPEG or PNG ({reason})") from None
    return image if image.dtype == torch.uint8 else TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNG


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 pixels [3, H, W] -> [3, size, size], antialiased bilinear."""
    return TF.resize(image, [size, size], antialias=True)


def load_image(data: bytes | bytearray, size: int) -> torch.Tensor:
    """JPEG or PNG bytes -> uint8 RGB pixels [3, size, size]; raises :class:`ImageError`."""
    return resize(decode_image(data), size)


def channel_values(values: Sequence[float], device: torch.device | str = "cpu") -> torch.Tensor:
    """A per-channel mean or std as float32 [1, 3, 1, 1], the shape :func:`normalize` broadcasts."""
    return torch.tensor(list(values), dtype=torch.float32, device=device).view(1, 3, 1, 1)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [N, 3, S, S] -> ``(x / 255 - mean) / std`` in float32, channels_last (on ``images``' device)."""
    pixels = images.float().div_(255).sub_(mean).div_(std)
    return pixels.contiguous(memory_format=torch.channels_last)
