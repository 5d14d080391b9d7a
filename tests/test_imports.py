"""lib's layering: no import cycle among its modules (function-level imports included), and a bottom layer that
imports nothing from lib (issue 21)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

from lib.artifacts import REPO_ROOT

LIB = REPO_ROOT / "lib"
BOTTOM_LAYER = ("stats", "linalg")


def lib_imports(path: Path, modules: set[str]) -> set[str]:
    """The lib modules that ``path`` imports anywhere in it: ``import lib.x``, ``from lib import x``,
    ``from lib.x import ...`` and the relative forms ``from . import x`` / ``from .x import ...``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("lib.")}
        elif isinstance(node, ast.ImportFrom):
            absolute = node.level == 0 and (node.module or "").split(".")[0] == "lib"
            relative = node.level == 1
            if not (absolute or relative):
                continue
            parts = (node.module or "").split(".")[1 if absolute else 0:]
            if parts and parts[0]:
                found.add(parts[0])
            else:
                found |= {alias.name for alias in node.names}
    return (found & modules) - {path.stem}


def import_graph() -> dict[str, set[str]]:
    paths = {path.stem: path for path in LIB.glob("*.py") if path.stem != "__init__"}
    return {name: lib_imports(path, set(paths)) for name, path in paths.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def test_the_import_walk_sees_every_form_and_finds_a_cycle(tmp_path):
    source = tmp_path / "a.py"
    source.write_text("import lib.b\nfrom lib import c\nfrom lib.d import x\nfrom . import e\nfrom .f import y\n"
                      "def later():\n    from lib import g\nimport os\nfrom lib.a import z\n")
    assert lib_imports(source, set("abcdefgh")) == set("bcdefg")
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_lib_has_no_import_cycle():
    graph = import_graph()
    assert graph["directions"] >= {"linalg"} and graph["runner"] >= {"profiles"}  # the walk sees real edges
    found = cycle(graph)
    assert found is None, f"import cycle in lib: {' -> '.join(found)}"


@pytest.mark.parametrize("module", BOTTOM_LAYER)
def test_the_bottom_layer_imports_nothing_from_lib(module):
    assert import_graph()[module] == set()


def test_lib_never_imports_the_books_machinery():
    """Dependencies flow one way: ``bookkit`` (the book's machinery) may import ``lib``, never the reverse."""
    offenders = []
    for path in sorted(LIB.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "bookkit"]
    assert not offenders, f"lib imports bookkit: {offenders}"
