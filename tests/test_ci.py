"""What CI relies on: tests that need the real sample fail where it is expected; the Python floor is right."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
NEEDS_SAMPLE = "tests/test_manifest.py::test_build_from_ids_uses_expected_quantity_and_lists_what_it_leaves_out"


def run_without_sample(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "BINCOUNT_REQUIRE_ABID"}
    environment |= {"BINCOUNT_ABID_SAMPLE": str(tmp_path / "absent"), **env}
    return subprocess.run(
        [sys.executable, "-m", "pytest", NEEDS_SAMPLE, "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_test_needing_the_sample_skips_without_it_but_fails_when_ci_requires_it(tmp_path: Path) -> None:
    relaxed = run_without_sample(tmp_path)
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout, relaxed.stdout
    required = run_without_sample(tmp_path, BINCOUNT_REQUIRE_ABID="1")
    assert required.returncode == 1 and "BINCOUNT_REQUIRE_ABID=1 says it must be there" in required.stdout, (
        required.stdout
    )
    assert "BINCOUNT_REQUIRE_ABID=1" in (ROOT / ".ci" / "run").read_text()


def test_requires_python_excludes_versions_without_tarfiles_data_filter() -> None:
    requires = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert "3.11.3" not in requires and "3.11.4" in requires
    assert f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}" in requires
