"""The layout keeps its promises: imports run one way, no cycles, no flow or task branches on the profile."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bincount", "flows", "tasks", "sm_scripts", "deployments")


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every cycle among the project's modules (one per strongly connected component), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle_inside_the_project() -> None:
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    # a package's __init__ importing its own modules is not a cycle of the code: leave parents out
    for module in list(graph.modules):
        for child in graph.find_children(module):
            if graph.direct_import_exists(importer=module, imported=child):
                graph.remove_import(importer=module, imported=child)
    assert import_cycles(graph) == []


def test_layers_and_independent_backends_hold() -> None:
    """import-linter's contracts in pyproject.toml: flows > tasks > factory > (local | sagemaker) > core > contracts."""
    run = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_flows_and_tasks_never_branch_on_the_profile() -> None:
    """Backends are picked in bincount/factory.py only: a comparison with ``.profile`` elsewhere is a second way."""
    offenders = []
    for folder in ("flows", "tasks"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Compare) and any(
                    isinstance(part, ast.Attribute) and part.attr == "profile"
                    for part in [node.left, *node.comparators]
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
