"""serving/ and autotune/ stay importable piece by piece: no import cycle (function-level imports count
too), no module over MAX_LINES, and serving never imports autotune (the tuner depends on serving, never
the reverse)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 400


def modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> set[str]:
    """Every absolute module name an import statement anywhere in the file names (and `from m import x`
    as both m and m.x, since x may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_serving_has_no_import_cycle_and_never_imports_autotune() -> None:
    mods = modules("serving")
    graph = {name: {d for d in imports(path) if d in mods and d != name} for name, path in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])
    tuner = {name: sorted(d for d in imports(p) if d.split(".")[0] == "autotune") for name, p in mods.items()}
    assert not {name: deps for name, deps in tuner.items() if deps}


def test_no_import_cycle_across_serving_and_autotune() -> None:
    mods = {**modules("serving"), **modules("autotune")}
    graph = {name: {d for d in imports(path) if d in mods and d != name} for name, path in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_no_module_is_over_the_line_budget() -> None:
    mods = {**modules("serving"), **modules("autotune")}
    sizes = {name: len(path.read_text().splitlines()) for name, path in mods.items()}
    assert not {name: n for name, n in sizes.items() if n > MAX_LINES}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
