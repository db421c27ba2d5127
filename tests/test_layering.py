"""Layering of the code: every module imports only modules below it (no import circle).

Every ``import`` and ``from ... import`` statement counts, wherever it is (module level, inside a function,
relative or absolute): a function-level import that closes a circle is still a circle. The graph is built
with :mod:`ast` over ``mattersim/``, ``workflows/`` and ``benchmarks/``; ``mattersim/cli.py`` is the top
(it may import anything, nothing imports it), ``workflows`` may use ``mattersim``, and ``benchmarks`` may
use both.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mattersim", "workflows", "benchmarks")
CLI = "mattersim.cli"

#: (importer, imported) -> "file:line" of the first statement that makes the edge
Graph = dict[str, dict[str, str]]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module of ``modules`` that importing ``name`` runs last: the longest known prefix of it."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> dict[str, int]:
    """The modules of ``modules`` that the statements of ``tree`` import (anywhere), with a line each."""
    found: dict[str, int] = {}

    def add(name: str | None, line: int) -> None:
        target = None if name is None else _resolve(name, modules)
        if target is not None and target != module:
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                package = module.split(".") if is_package else module.split(".")[:-1]
                keep = len(package) - (node.level - 1)
                if keep <= 0:
                    continue
                base = ".".join(package[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base, node.lineno)  # from pkg import submodule
    return found


def build_graph(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> Graph:
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    modules = set(files)
    graph: Graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found = imports_of(tree, module, path.name == "__init__.py", modules)
        rel = path.relative_to(root).as_posix()
        graph[module] = {target: f"{rel}:{line}" for target, line in sorted(found.items())}
    return graph


def cycles(graph: Graph) -> list[tuple[list[str], list[str]]]:
    """Per strongly connected component with a circle (Tarjan, iterative): its modules and its shortest
    circle ``[a, b, ..., a]`` through the first of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
            elif child not in graph:
                continue
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    found = []
    for component in components:
        members = set(component)
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        start = component[0]  # shortest way back to start, within the component (breadth first)
        previous: dict[str, str] = {}
        frontier = [start]
        while start not in previous:
            following = []
            for node in frontier:
                for target in sorted(graph[node]):
                    if target in members and target not in previous:
                        previous[target] = node
                        following.append(target)
            frontier = following
        path = [start]
        while True:
            path.append(previous[path[-1]])
            if path[-1] == start:
                break
        found.append((component, path[::-1]))
    return found


def describe(graph: Graph, found: list[tuple[list[str], list[str]]]) -> str:
    lines = []
    for component, circle in found:
        lines.append(f"{len(component)} modules import each other ({', '.join(component)}), e.g. "
                     + " -> ".join(circle))
        lines += [f"    {a} -> {b} ({graph[a][b]})" for a, b in zip(circle, circle[1:])]
    return "\n".join(lines)


def subgraph(graph: Graph, keep) -> Graph:
    return {m: {t: w for t, w in edges.items() if keep(t)} for m, edges in graph.items() if keep(m)}


def _in(package: str):
    return lambda module: module == package or module.startswith(package + ".")


GRAPH = build_graph()


def test_graph_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("import pkg.a\nfrom ..b import thing\nfrom pkg import VERSION\n")
    graph = build_graph(tmp_path, ("pkg",))
    assert set(graph["pkg.a"]) == {"pkg.b"}  # inside a function, a submodule named by from-import
    assert set(graph["pkg.b"]) == {"pkg.sub.c"}
    assert set(graph["pkg.sub"]) == {"pkg.sub.c"}
    assert set(graph["pkg.sub.c"]) == {"pkg.a", "pkg.b", "pkg"}
    assert cycles(graph) == [(["pkg.a", "pkg.b", "pkg.sub.c"], ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"])]
    # and the real tree: the lazy imports of the code are seen
    assert "mattersim.potential" in GRAPH["mattersim.calculator"]
    assert "mattersim.checkpoint" in GRAPH["mattersim.potential"]  # a function-level import


def test_no_import_circle_in_mattersim():
    found = cycles(subgraph(GRAPH, _in("mattersim")))
    assert not found, "import circles in mattersim/:\n" + describe(GRAPH, found)


def test_nothing_imports_the_cli():
    users = [f"{m} ({edges[CLI]})" for m, edges in GRAPH.items() if CLI in edges]
    assert not users, f"{CLI} is the top layer, yet these import it: {', '.join(users)}"


def test_mattersim_uses_no_workflow_or_benchmark():
    bad = [f"{m} -> {t} ({w})" for m, edges in GRAPH.items() if _in("mattersim")(m) and m != CLI
           for t, w in edges.items() if _in("workflows")(t) or _in("benchmarks")(t)]
    assert not bad, "only mattersim/cli.py may import workflows or benchmarks:\n" + "\n".join(bad)


def test_workflows_use_no_benchmark():
    bad = [f"{m} -> {t} ({w})" for m, edges in GRAPH.items() if _in("workflows")(m)
           for t, w in edges.items() if _in("benchmarks")(t)]
    assert not bad, "workflows may not import benchmarks:\n" + "\n".join(bad)


def test_no_import_circle_anywhere_below_the_cli():
    found = cycles(subgraph(GRAPH, lambda m: m != CLI))
    assert not found, "import circles:\n" + describe(GRAPH, found)
