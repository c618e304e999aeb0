"""The layout's rule: dependencies run one way between the folders, checked on every module's imports.

Module-level imports only: a function may import a heavier stage where it needs it (the CLI's
commands do), because that costs nothing until the function runs and makes no import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# folder -> (its import name, the captool packages its modules may import at module level)
ALLOWED = {
    "runtime": ("captool", set()),
    "models": ("captool.models", set()),
    "datasets": ("captool.datasets", {"captool"}),
    "training": ("captool.training", {"captool", "captool.datasets"}),
    "evaluation": ("captool.evaluation", {"captool", "captool.datasets"}),
    "export": ("captool.export", {"captool", "captool.datasets", "captool.training", "captool.evaluation"}),
    "benchmarks": ("captool.benchmarks", {"captool", "captool.datasets", "captool.evaluation"}),
    "ray_engine": ("captool.ray", {"captool"}),
}
STAGES = {name for name, _ in ALLOWED.values()} - {"captool"}


def stage_of(module: str) -> str:
    """The package a `captool...` module belongs to: captool.training.model -> captool.training."""
    for stage in sorted(STAGES, key=len, reverse=True):
        if module == stage or module.startswith(stage + "."):
            return stage
    return "captool"


def top_level_imports(path: Path, package: str) -> set[str]:
    """The captool modules a file imports outside any function or class body (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return {m for m in found if m == "captool" or m.startswith("captool.")}


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_each_folder_imports_only_the_stages_before_it(folder):
    package, allowed = ALLOWED[folder]
    files = sorted((REPO / folder).glob("*.py"))
    assert files, f"{folder}/ has no modules"
    wrong = []
    for path in files:
        for module in top_level_imports(path, package):
            stage = stage_of(module)
            if stage != package and stage not in allowed:
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert not wrong, "; ".join(wrong)


def test_the_allowed_imports_have_no_cycle():
    graph = {package: allowed - {package} for package, allowed in ALLOWED.values()}
    seen, order = set(), []

    def visit(node, path):
        assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
        if node not in seen:
            for nxt in graph.get(node, ()):
                visit(nxt, [*path, node])
            seen.add(node)
            order.append(node)

    for node in graph:
        visit(node, [])
    assert order.index("captool") < order.index("captool.training") < order.index("captool.export")


def test_cli_lists_commands_in_workflow_order():
    from typer.main import get_command

    from captool.cli import app

    names = list(get_command(app).commands)
    assert names == ["synth", "train", "export", "verify", "run", "eval", "bench", "info", "conform"]
