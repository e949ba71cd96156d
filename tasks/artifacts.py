"""Helpers that put results in the Prefect UI: plots as inline PNGs, throttled progress bars."""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact


def publish_plot(key: str, png: bytes, title: str, description: str = "") -> None:
    """A markdown artifact showing ``png`` inline (renders in the UI with no network access)."""
    encoded = base64.b64encode(png).decode()
    create_markdown_artifact(
        key=key,
        markdown=f"### {title}\n\n{description}\n\n![{title}](data:image/png;base64,{encoded})\n",
        description=title,
    )


def show(value: Any) -> str:
    """A value for people: floats to 3 significant digits, nothing as '-', no character that breaks a table."""
    if value is None:
        return "-"
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table of ``rows`` (cells through :func:`show`): the UI wraps its cells, where a table artifact
    clips them."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(show(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class ProgressArtifact:
    """A Prefect progress artifact updated at most every ``interval_s`` seconds (and at the end)."""

    def __init__(self, key: str, description: str, interval_s: float = 2.0) -> None:
        self._id = create_progress_artifact(progress=0.0, key=key, description=description)
        self._interval_s = interval_s
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self._interval_s:
            return
        self._last = now
        update_progress_artifact(self._id, progress=100.0 * done / total if total else 100.0)
