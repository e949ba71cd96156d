"""What can be checked of the AWS worker image without a Docker engine: the lock it installs from,
the share of it the image takes, the files it copies, and the flows its deployments run."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deployments.aws.worker_requirements import DEV_TOOLS, TORCH, parse_lock, worker_packages

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
DOCKERFILE = ROOT / "deployments" / "aws" / "Dockerfile"
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")


def _project_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in requirements if canonicalize_name(r.name) != "bincount"]


def _installed_closure(roots: list[Requirement]) -> set[str]:
    """Every distribution the roots need in this environment, from the installed packages' metadata."""
    environment = default_environment()
    seen: set[str] = set()
    todo = [(r, set(r.extras)) for r in roots]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        for raw in importlib.metadata.distribution(name).requires or []:
            dependency = Requirement(raw)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({**environment, "extra": e}) for e in extras | {""}):
                todo.append((dependency, set(dependency.extras)))
    return {key.split("[")[0] for key in seen}


def test_the_lock_pins_every_project_requirement_within_its_range():
    entries = parse_lock(LOCK.read_text())
    for requirement in _project_requirements("aws", "dev"):
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{name} is in pyproject.toml but not in requirements.lock: compile the lock again"
        version = entries[name][0]
        assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} is outside {requirement}"


def test_every_locked_package_has_hashes():
    entries = parse_lock(LOCK.read_text())
    unhashed = [name for name, (_, lines, _) in entries.items() if not any("--hash=sha256:" in line for line in lines)]
    assert not unhashed


def test_the_installed_environment_is_the_locked_one():
    entries = parse_lock(LOCK.read_text())
    for requirement in _project_requirements("aws", "dev"):
        name = canonicalize_name(requirement.name)
        assert importlib.metadata.version(name) == entries[name][0], f"{name}: installed is not the locked version"


def test_the_worker_share_keeps_what_the_flows_need_and_drops_tools_and_cuda():
    entries = parse_lock(LOCK.read_text())
    kept = set(worker_packages(entries))
    needed = {name for name in _installed_closure(_project_requirements("aws")) - TORCH if not CUDA_ONLY.match(name)}
    assert not needed - kept, f"the worker image would lack {sorted(needed - kept)}"
    assert not kept - needed, f"the worker image would carry {sorted(kept - needed)}, which it does not need"
    assert not kept & (DEV_TOOLS | TORCH)
    assert not {name for name in kept if CUDA_ONLY.match(name)}
    assert {"prefect", "prefect-aws", "sagemaker", "smdebug", "sympy", "setuptools"} <= kept


def test_the_worker_share_is_a_hashed_requirements_file_and_torch_comes_as_cpu_builds():
    script = ROOT / "deployments" / "aws" / "worker_requirements.py"
    share = subprocess.run([sys.executable, script, LOCK], capture_output=True, text=True, check=True).stdout
    lines = [line for line in share.splitlines() if line and not line.startswith("#")]
    requirement = r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[a-z0-9,_-]+\])?==\S+ \\"
    requirement_or_hash = re.compile(rf"^({requirement}|    --hash=sha256:[0-9a-f]{{64}}( \\)?)$")
    assert lines and all(requirement_or_hash.match(line) for line in lines), share
    assert not re.search(r"^(torch|torchvision|pytest|nvidia-cublas)==", share, re.MULTILINE)
    pins = subprocess.run([sys.executable, script, LOCK, "--torch"], capture_output=True, text=True, check=True).stdout
    assert pins.split() == [
        f"torch=={importlib.metadata.version('torch')}+cpu",
        f"torchvision=={importlib.metadata.version('torchvision')}+cpu",
    ]


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_everything_the_dockerfile_copies_exists_and_is_in_the_build_context():
    copies = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            *sources, _destination = shlex.split(line)[1:]
            copies += sources
    assert {"requirements.lock", "pyproject.toml", "bincount", "flows", "tasks", "sm_scripts"} <= set(copies)
    ignored = _dockerignore()
    for source in copies:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is in .dockerignore"


@pytest.mark.parametrize(
    "entrypoint",
    [d["entrypoint"] for d in yaml.safe_load((ROOT / "deployments" / "aws.prefect.yaml").read_text())["deployments"]],
)
def test_the_aws_deployments_entrypoints_import(entrypoint):
    path, name = entrypoint.split(":")
    assert (ROOT / path).is_file()
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert callable(getattr(module, name))


def test_the_aws_deployments_run_the_image_from_the_dockerfile_in_its_folder():
    config = yaml.safe_load((ROOT / "deployments" / "aws.prefect.yaml").read_text())
    assert config["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/bincount"}}]
    assert "WORKDIR /opt/bincount" in DOCKERFILE.read_text()
    for deployment in config["deployments"]:
        assert deployment["work_pool"]["job_variables"]["image"] == "{{ $BINCOUNT_IMAGE }}"
