"""The agent's import graph, read from the source with ast, and a check that it has no cycle.

`python -m tests.importgraph` (part of `make lint`) exits 1 naming every cycle between
modules and between packages; tests/unit/test_architecture.py checks the layering on the
same graph. Every import counts, also those inside functions and under TYPE_CHECKING:
a deferred import hides a cycle, it does not break it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "rpc", "storage", "ovfstore")

# The process's entry point: it builds the rpc edge over the agent's pieces, so it stands
# above rpc, not in the agent package's room (rpc imports agent.context and agent.jobs).
ENTRY_POINTS = ("agent.daemon",)

# Cycles left for a later step, each with the reason. An entry is the cycle's modules,
# sorted; the check fails if an allowed cycle is gone (so the list stays true).
ALLOWED_MODULE_CYCLES: dict[tuple[str, ...], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the agent's packages, by dotted name."""
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _is_package(name: str, known: dict[str, Path]) -> bool:
    return name in known and known[name].name == "__init__.py"


def _has_children(name: str, edges: dict[str, set[str]]) -> bool:
    return any(m.startswith(name + ".") for m in edges)


def _imported(tree: ast.AST, name: str, known: dict[str, Path]) -> Iterator[str]:
    package = name if _is_package(name, known) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from pkg import mod` imports the submodule mod; `from mod import x` the module
                sub = f"{base}.{alias.name}"
                yield sub if sub in known else base


def graph() -> dict[str, set[str]]:
    """module -> the agent's modules it imports (the nearest known module of each name)."""
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        targets: set[str] = set()
        for target in _imported(tree, name, known):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        edges[name] = targets
    return edges


def package_of(module: str, depth: int) -> str:
    """The package a module belongs to, at a depth (1: agent, storage; 2: storage.domains)."""
    return ".".join(module.split(".")[:depth])


def room(module: str) -> str:
    """The top-level package of a module, an entry point its own room."""
    return module if module in ENTRY_POINTS else package_of(module, 1)


def collapse(edges: dict[str, set[str]], key: Callable[[str], str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for src, targets in edges.items():
        for dst in targets:
            a, b = key(src), key(dst)
            out.setdefault(a, set())
            if a != b:
                out[a].add(b)
    return out


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(tuple(sorted(comp)))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def sibling_packages(edges: dict[str, set[str]]) -> Iterable[tuple[str, dict[str, set[str]]]]:
    """For each package, the graph among its direct children (a subpackage collapsed to
    one node, a module its own node): storage.domains and storage.leases must not import
    each other both ways, whatever the modules."""
    parents = {m.rpartition(".")[0] for m in edges if "." in m}
    for parent in sorted(parents):
        prefix = parent + "."
        depth = parent.count(".") + 2
        inner = {
            src: {dst for dst in targets if dst.startswith(prefix)}
            for src, targets in edges.items()
            if src.startswith(prefix)
        }
        yield parent, collapse(inner, lambda m, d=depth: package_of(m, d))


def problems() -> list[str]:
    edges = graph()
    out: list[str] = []
    module_cycles = cycles(edges)
    for cyc in module_cycles:
        if cyc not in ALLOWED_MODULE_CYCLES:
            out.append("module cycle: " + " <-> ".join(cyc))
    for cyc in ALLOWED_MODULE_CYCLES:
        if cyc not in module_cycles:
            out.append("allowed cycle no longer there (remove it from the list): " + str(cyc))
    for cyc in cycles(collapse(edges, room)):
        out.append("package cycle: " + " <-> ".join(cyc))
    for parent, sub in sibling_packages(edges):
        for cyc in cycles(sub):
            # a cycle of plain modules only is a module cycle, reported above
            if any(node not in edges or _has_children(node, edges) for node in cyc):
                out.append(f"package cycle in {parent}: " + " <-> ".join(cyc))
    return out


def main() -> int:
    found = problems()
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} import cycle problem(s)", file=sys.stderr)
        return 1
    print(f"no import cycle among {len(graph())} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
