"""The container code: where ``sm_scripts/`` lies, its entry points, and one hash over all of it.

SageMaker ships the whole folder as ``source_dir``, and the local backends run it from here, so
the hash covers every file of it: it keys training caches, SageMaker model names and the
registry's record of which code made a model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SM_SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "sm_scripts"
TRAIN_ENTRY_POINT = "train.py"
INFERENCE_ENTRY_POINT = "inference.py"


def code_files() -> list[Path]:
    """Every file SageMaker would ship from ``sm_scripts/`` (caches and bytecode left out)."""
    return sorted(
        path
        for path in SM_SCRIPTS_DIR.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in {".pyc", ".pyo"}
    )


def code_hash() -> str:
    """SHA-256 over the names and bytes of :func:`code_files`."""
    digest = hashlib.sha256()
    for path in code_files():
        digest.update(str(path.relative_to(SM_SCRIPTS_DIR)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()
