"""The layout of the two packages: lib (the science) and bookkit (the book's machinery). No import cycle (function-
level imports included), a bottom layer of lib that imports nothing from lib, lib never importing bookkit, no
machinery module in lib, imports at the top of each module, and no function with a long list of parameters."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

from lib.artifacts import REPO_ROOT

PACKAGES = ("lib", "bookkit")
BOTTOM_LAYER = ("lib.stats", "lib.linalg")
MACHINERY = ("runner", "chapters", "profiles", "parameters", "lanes", "suite", "install", "site_assets",
             "chapter_log")
MAX_PARAMETERS = 8
# function-level imports of a lib or bookkit module, each with its reason (none is needed today)
LAZY_IMPORTS: dict[tuple[str, str], str] = {}


def modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Every module of both packages, by dotted name (``lib.directions``)."""
    return {f"{package}.{path.stem}": path for package in PACKAGES for path in sorted((root / package).glob("*.py"))
            if path.stem != "__init__"}


def imports_of(path: Path, package: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` (a module of ``package``) imports anywhere in it: ``import p.x``,
    ``from p import x``, ``from p.x import ...`` and the relative forms ``from . import x`` / ``from .x import``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {".".join(alias.name.split(".")[:2]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = (node.module or "") if node.level == 0 else f"{package}.{node.module or ''}".rstrip(".")
            if base.count(".") >= 1:
                found.add(".".join(base.split(".")[:2]))
            else:
                found |= {f"{base}.{alias.name}" for alias in node.names}
    return (found & known) - {f"{package}.{path.stem}"}


def import_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports_of(path, name.split(".")[0], set(found)) for name, path in found.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def function_imports(path: Path) -> list[tuple[str, str]]:
    """(function, imported module) for every import of a lib or bookkit module inside a function of ``path``."""
    found = []
    for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or "."] if isinstance(node, ast.ImportFrom) else [])
                found += [(function.name, name) for name in names
                          if name.split(".")[0] in PACKAGES or name.startswith(".")]
    return found


def long_signatures(path: Path) -> list[str]:
    """Functions of ``path`` that take more than ``MAX_PARAMETERS`` parameters (``self``/``cls`` not counted)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            named = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            count = len(named) + bool(args.vararg) + bool(args.kwarg) - bool(named and named[0].arg in ("self", "cls"))
            if count > MAX_PARAMETERS:
                found.append(f"{path.name}:{node.lineno} {node.name} ({count})")
    return found


def test_the_walks_see_every_form_and_find_what_they_look_for(tmp_path):
    (tmp_path / "lib").mkdir()
    source = tmp_path / "lib" / "a.py"
    source.write_text("import lib.b\nfrom lib import c\nfrom lib.d import x\nfrom . import e\nfrom .f import y\n"
                      "def later():\n    from lib import g\nimport os\nfrom lib.a import z\n"
                      "def wide(self, a, b, c, d, e, f, g, h, *rest):\n    import bookkit.runner\n")
    assert imports_of(source, "lib", {f"lib.{m}" for m in "abcdefgh"}) == {f"lib.{m}" for m in "bcdefg"}
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert function_imports(source) == [("later", "lib"), ("wide", "bookkit.runner")]
    assert long_signatures(source) == ["a.py:10 wide (9)"]


def test_no_import_cycle_in_either_package():
    graph = import_graph()
    assert graph["lib.directions"] >= {"lib.linalg"} and graph["bookkit.runner"] >= {"bookkit.profiles"}
    found = cycle(graph)
    assert found is None, f"import cycle: {' -> '.join(found)}"


@pytest.mark.parametrize("module", BOTTOM_LAYER)
def test_the_bottom_layer_imports_nothing_from_lib(module):
    assert import_graph()[module] == set()


def test_lib_never_imports_the_books_machinery():
    """Dependencies flow one way: ``bookkit`` may import ``lib``, never the reverse."""
    offenders = sorted(f"{name} -> {imported}" for name, imported_modules in import_graph().items()
                       if name.startswith("lib.") for imported in imported_modules if imported.startswith("bookkit."))
    assert not offenders, f"lib imports bookkit: {offenders}"


def test_the_machinery_is_not_in_lib():
    assert not [name for name in MACHINERY if (REPO_ROOT / "lib" / f"{name}.py").exists()]
    assert all((REPO_ROOT / "bookkit" / f"{name}.py").exists() for name in MACHINERY)


def test_imports_of_the_packages_sit_at_the_top_of_each_module():
    found = {(path.name, function): imported for path in modules().values()
             for function, imported in function_imports(path)}
    unexplained = sorted(key for key in found if key not in LAZY_IMPORTS)
    assert not unexplained, f"function-level imports without a reason in LAZY_IMPORTS: {unexplained}"
    assert len(found) <= 5


def test_no_function_takes_more_than_eight_parameters():
    found = [entry for path in modules().values() for entry in long_signatures(path)]
    assert not found, f"functions with more than {MAX_PARAMETERS} parameters: {found}"
