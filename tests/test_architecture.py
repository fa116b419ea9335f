"""The package's shape: data flows one way (no import cycle, lazy imports included) and no module
reaches into another's private names. Read from the source with ``ast``, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "z0inf_pipeline"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((target, [alias.name for alias in node.names]))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a ``from package import module`` counts the module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names in _imports(module, path):
            for name in [target, *(f"{target}.{n}" for n in names)]:
                # a package's own __init__ is imported on the way to its sub-modules: not a cycle
                if name in modules and name != module and not module.startswith(name + "."):
                    graph[module].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring visited modules)."""
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_a_lazy_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("folder", ["z0inf_pipeline", "benchmarks"])
def test_no_private_name_is_imported_from_another_module(folder):
    modules = {path: name for name, path in _modules().items()}
    reaches = []
    for path in (ROOT / folder).rglob("*.py"):
        for target, names in _imports(modules.get(path, path.stem), path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                reaches.append(f"{path.relative_to(ROOT)}: from {target} import {', '.join(private)}")
    assert not reaches, "private names imported across modules:\n" + "\n".join(reaches)


def test_tracking_imports_nothing_above_it():
    """``tracking`` (MLflow) sits on ``training`` and ``influence``; nothing above it is imported."""
    above = ("integrations", "review", "defs", "cli", "evaluation", "quality", "deployments", "definitions")
    reaches = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        if m.startswith("z0inf_pipeline.tracking")
        for t in targets
        if t.split(".")[1] in above
    ]
    assert not reaches, reaches


def test_no_dagster_internals_are_named():
    """Dagster's public API only: an internal module (``dagster._core...``), imported or named in a string
    (a logger name), is an upgrade risk."""
    reaches = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in (ROOT / "z0inf_pipeline").rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "dagster._" in line
    ]
    assert not reaches, "\n".join(reaches)
