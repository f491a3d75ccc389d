"""The house stays easy to change: no import cycle between modules (hidden inside a function or
not), no private name reached across modules, and the model file stays small. The layering
itself is `make lint`'s (pyproject.toml's import-linter contracts)."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

SRC = Path(__file__).resolve().parents[1] / "src" / "veridraft"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    graph = grimp.build_graph("veridraft")  # every import statement, function-level ones too
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert cycles(edges) == []


def private_uses(path: Path) -> list[str]:
    """`from X import _name` and `module._name` (not self/cls, not dunders) in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported_modules = {
        (a.asname or a.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for a in node.names
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno}: from {node.module} import {a.name}")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in imported_modules
            and node.value.id not in ("torch", "np", "sys", "os")  # their own internals
        ):
            found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_private_name_check_sees_both_forms(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from .a import _x, y\nfrom . import b\nb._z()\nself._w = 1\nb.__doc__\n")
    assert private_uses(f) == ["m.py:1: from a import _x", "m.py:3: b._z"]


def test_no_private_name_used_across_modules():
    found = [u for p in sorted(SRC.rglob("*.py")) for u in private_uses(p)]
    assert found == []


def test_the_model_file_stays_small():
    assert len((SRC / "models" / "base.py").read_text().splitlines()) < 500
