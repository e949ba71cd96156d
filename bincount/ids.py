"""The one validator for names that become paths: image ids and relative object keys.

An id or key read from a manifest, an id file or a bucket listing is joined to a local folder or
an output prefix; ``..``, an absolute path or a backslash there would reach outside it. Every
place that turns such a name into a path or URI checks it here first.
"""

from __future__ import annotations

import re

IMAGE_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")
"""What an ABID image id looks like (``00710``, ``103563``); also what makes it safe as a file name."""


PRODUCTION_PHOTO_PREFIX = "fb-"
"""What starts the id of a photo harvested from production (``bincount.feedback.photo_id``); no ABID id does."""


def is_production_photo(image_id: str) -> bool:
    """Whether ``image_id`` names a photo harvested from production rather than one of the dataset's originals."""
    return image_id.startswith(PRODUCTION_PHOTO_PREFIX)


class UnsafeNameError(ValueError):
    """An id or key would leave its folder or prefix; the message names it and what is allowed."""


def check_image_id(value: object, where: str = "image id") -> str:
    """Return ``value`` if it is an image id: 1-128 letters, digits, ``_`` or ``-``.

    Raises:
        UnsafeNameError: naming ``where`` and the value.
    """
    if not isinstance(value, str) or not IMAGE_ID.fullmatch(value):
        raise UnsafeNameError(
            f"{where} = {value!r} is not an image id: use 1-128 letters, digits, '_' or '-' (like '00710')"
        )
    return value


def check_key(value: str, where: str = "key") -> str:
    """Return ``value`` if it is a relative key that stays under its prefix once joined to it.

    Raises:
        UnsafeNameError: the key is empty, absolute, or has an empty, ``.`` or ``..`` segment,
            a backslash or a NUL byte.
    """
    segments = value.split("/")
    if not value or "\\" in value or "\x00" in value or any(part in ("", ".", "..") for part in segments):
        raise UnsafeNameError(
            f"{where} {value!r} is not a plain relative key: it must not start with '/' or hold "
            "'..', '.', '//', a backslash or a NUL byte; rename the object"
        )
    return value
