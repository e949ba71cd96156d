"""Makes this folder the package ``sm_scripts`` when its entry points run as loose files.

SageMaker runs ``python train.py`` in this folder (``/opt/ml/code``) and its serving container imports
``inference`` with this folder on ``sys.path``: neither is a package import, and the folder's name
there is not ``sm_scripts``. Each entry point then calls :func:`register` first, so every module
imports its siblings one way, ``from sm_scripts.data import ...``, installed as part of the
project or not. Imported as ``sm_scripts.train`` / ``sm_scripts.inference``, nothing calls it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE = "sm_scripts"


def register() -> None:
    """Import this folder, from its own files, as the package ``sm_scripts`` (unless one is imported already)."""
    if PACKAGE in sys.modules:
        return
    folder = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location(
        PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None  # a file location always gives both
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
