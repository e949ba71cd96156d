"""The layout keeps its promises: imports run one way, no cycles, no flow or task branches on the profile."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bincount", "flows", "tasks", "sm_scripts", "deployments")


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every cycle among the project's modules, one per strongly connected component (networkx's)."""
    edges = nx.DiGraph(
        (module, imported) for module in graph.modules for imported in graph.find_modules_directly_imported_by(module)
    )
    return sorted(sorted(component) for component in nx.strongly_connected_components(edges) if len(component) > 1)


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
