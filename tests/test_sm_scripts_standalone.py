"""sm_scripts/ alone, as SageMaker ships it (``source_dir``): its entry points run without the project.

The folder is copied into an empty one named ``code`` (SageMaker's ``/opt/ml/code``: not the package's
own name) and run there with ``python -S``: no site initialisation, so the project's editable install
(a ``.pth`` finder that maps ``sm_scripts`` and ``bincount`` to this checkout) is not active; only
the environment's site-packages (torch, torchvision, numpy, PIL) are on the path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SM_SCRIPTS = Path(__file__).resolve().parents[1] / "sm_scripts"


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("container") / "code"
    shutil.copytree(SM_SCRIPTS, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def run_alone(code_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -S <args>`` in ``code_dir``, with the third-party packages and nothing of the project."""
    site_packages = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(sorted(site_packages))
    return subprocess.run(
        [sys.executable, "-S", *args], cwd=code_dir, env=env, capture_output=True, text=True, timeout=180
    )


def test_the_project_is_not_importable_there(code_dir: Path) -> None:
    script = "import importlib.util as u; print(u.find_spec('bincount'), u.find_spec('sm_scripts'))"
    result = run_alone(code_dir, "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None"]


def test_train_py_help_runs_as_a_loose_file(code_dir: Path) -> None:
    result = run_alone(code_dir, "train.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "--checkpoint-dir" in result.stdout and "(default: resnet50)" in result.stdout


def test_inference_imports_as_a_top_level_module(code_dir: Path) -> None:
    script = (
        "import sys, inference\n"
        "ours = [m for name, m in sys.modules.items() if name.split('.')[0] in ('sm_scripts', 'inference')]\n"
        "loaded = [m.__file__ for m in ours]\n"
        "print('\\n'.join(loaded))\n"
    )
    result = run_alone(code_dir, "-c", script)
    assert result.returncode == 0, result.stderr
    loaded = [Path(line) for line in result.stdout.splitlines()]
    assert code_dir / "inference.py" in loaded and code_dir / "networks.py" in loaded
    assert all(path.parent == code_dir for path in loaded)  # every module from the copy, none from the checkout
