"""The layering of ARCHITECTURE.md, checked on the import graph (tests/importgraph.py):
each module's room, and the rooms each room may import. Calls go one way."""

from __future__ import annotations

import importlib

import pytest

from tests import importgraph, sizes

# Top to bottom. A module's room is its longest matching prefix here.
ROOMS: dict[str, str] = {
    "agent.daemon": "entry",          # the process's main(): builds the edge over the agent
    "rpc": "edge",                    # transport, verb table, schemas, client, CLI
    "agent": "process",               # config, the composition root, jobs, events, metrics
    "ovfstore": "ovfstore",           # the OVF store volume
    "storage.domains": "services",
    "storage.connections": "services",
    "storage.leases": "services",
    "storage.devices": "services",
    "storage.transfers": "services",
    "storage": "primitives",          # locks, metadata, fileio, fileaccess, ids
    "storage.errors": "base",
    # tool wrappers: one thin module per external tool, and their runner
    "storage.commands": "tools",
    "storage.lvm": "tools",
    "storage.lvmreport": "tools",
    "storage.lvmshell": "tools",
    "storage.qemuimg": "tools",
    "storage.iscsiadm": "tools",
    "storage.multipath": "tools",
    "storage.udev": "tools",
    "storage.mount": "tools",
    "storage.nbd": "tools",
}

BELOW: dict[str, set[str]] = {
    "entry": {"edge", "process", "ovfstore", "services", "primitives", "tools", "base"},
    "edge": {"process", "ovfstore", "services", "primitives", "tools", "base"},
    "process": {"ovfstore", "services", "primitives", "tools", "base"},
    "ovfstore": {"services", "primitives", "tools", "base"},
    "services": {"primitives", "tools", "base"},
    "primitives": {"tools", "base"},
    "tools": {"base"},
    "base": set(),
}

# Within the storage services: domains are built over connections and leases.
FORBIDDEN_PREFIXES = [
    ("storage.connections", "storage.domains"),
    ("storage.leases", "storage.domains"),
    ("storage.leases", "storage.connections"),
    ("storage.connections", "storage.leases"),
]


def room(module: str) -> str:
    best = max((p for p in ROOMS if module == p or module.startswith(p + ".")), key=len)
    return ROOMS[best]


def violations(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            a, b = room(src), room(dst)
            if a != b and b not in BELOW[a]:
                out.append(f"{src} ({a}) imports {dst} ({b})")
            for low, high in FORBIDDEN_PREFIXES:
                if src.startswith(low) and dst.startswith(high):
                    out.append(f"{src} imports {dst}: {low} is below {high}")
    return out


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return importgraph.graph()


def test_every_module_imports(edges: dict[str, set[str]]) -> None:
    assert len(edges) > 60, sorted(edges)
    for name in sorted(edges):
        importlib.import_module(name)


def test_every_module_has_a_room(edges: dict[str, set[str]]) -> None:
    for name in edges:
        assert room(name) in BELOW, name


def test_imports_go_one_way(edges: dict[str, set[str]]) -> None:
    # the graph is the real one: the edge calls the domains, a domain runs qemu-img
    assert "storage.domains" in edges["rpc.verbs.volumes"]
    assert "storage.qemuimg" in edges["storage.domains.base"]
    assert violations(edges) == []


def test_no_import_cycle() -> None:
    assert importgraph.problems() == []


@pytest.mark.parametrize(("src", "dst"), [
    ("storage.domains.base", "agent.jobs"),          # storage never imports the agent
    ("ovfstore.service", "agent.locks"),
    ("storage.lvm", "storage.domains.base"),          # a tool wrapper never imports a domain
    ("storage.qemuimg", "storage.connections.manager"),
    ("storage.mount", "rpc.verbs.volumes"),
    ("agent.jobs", "rpc.dispatch"),                   # only the entry point builds the edge
    ("rpc.server", "agent.daemon"),
    ("storage.domains.registry", "ovfstore.service"),
    ("storage.leases.local", "storage.domains.base"),
    ("storage.errors", "storage.metadata"),
])
def test_forbidden_import_is_reported(src: str, dst: str) -> None:
    assert violations({src: {dst}}) != []


def test_cycle_is_reported() -> None:
    assert importgraph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ("a", "b", "c")]
    pkgs = importgraph.collapse({"storage.x": {"agent.y"}, "agent.y": {"storage.z"}},
                                importgraph.room)
    assert importgraph.cycles(pkgs) == [("agent", "storage")]


def test_no_module_or_function_too_long() -> None:
    assert sizes.problems() == []


def test_too_long_is_reported() -> None:
    lines = [f"    x{i} = {i}" for i in range(sizes.MAX_FUNCTION_LINES)]
    assert sizes.oversized("\n".join(["def f() -> None:", *lines]), "m.py") == [
        f"m.py:1: function f ({sizes.MAX_FUNCTION_LINES + 1} lines > "
        f"{sizes.MAX_FUNCTION_LINES})"]
    assert sizes.oversized("\n".join(["def f() -> None:", *lines[1:]]), "m.py") == []
    big = "x = 1\n" * (sizes.MAX_MODULE_LINES + 1)
    assert sizes.oversized(big, "m.py") == [
        f"m.py: module ({sizes.MAX_MODULE_LINES + 1} lines > {sizes.MAX_MODULE_LINES})"]
