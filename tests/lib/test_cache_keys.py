"""lib.artifacts.code_fingerprint: cache keys follow the science code, not its documentation or the machinery."""

import shutil

import pytest

from lib import artifacts


@pytest.fixture
def lib_copy(tmp_path):
    """A copy of lib/ to edit."""
    return shutil.copytree(artifacts.LIB_DIR, tmp_path / "lib", ignore=shutil.ignore_patterns("__pycache__"))


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_the_copy_has_the_fingerprint_of_lib(lib_copy):
    assert artifacts.code_fingerprint(lib_copy) == artifacts.code_fingerprint() == artifacts.lib_fingerprint()


def test_docstrings_comments_and_blank_lines_leave_the_key_unchanged(lib_copy):
    before = artifacts.code_fingerprint(lib_copy)
    _edit(lib_copy / "directions.py", '"""', '"""A rewritten module docstring.\n\n', )
    _edit(lib_copy / "linalg.py", "def unit(", "# a new comment\n\n\ndef unit(")
    _edit(lib_copy / "ablation.py", '    """', '    """Rewritten function docstring. ')
    _edit(lib_copy / "families.yaml", "\n", "\n# a comment in the family list\n")
    assert artifacts.code_fingerprint(lib_copy) == before


def test_machinery_and_charts_leave_the_key_unchanged(lib_copy):
    """bookkit is not in lib's folder, so it is never hashed; inside lib, progress bars and charts compute nothing a
    cache stores."""
    before = artifacts.code_fingerprint(lib_copy)
    _edit(lib_copy / "viz.py", "SIGNIFICANT_DIGITS = 3", "SIGNIFICANT_DIGITS = 4")
    _edit(lib_copy / "progress.py", "leave=False", "leave=True")
    (lib_copy / "notes.txt").write_text("not code")
    assert artifacts.code_fingerprint(lib_copy) == before
    assert not any(path.name == "bookkit" for path in artifacts.LIB_DIR.iterdir())


@pytest.mark.parametrize("file, old, new", [
    ("linalg.py", "return vectors / norms", "return vectors / (norms + 0)"),
    ("stats.py", "EDGE_FRACTION = 1e-3", "EDGE_FRACTION = 2e-3"),
    ("recipes.yaml", "steps: 300", "steps:   300"),
])
def test_a_change_to_the_science_changes_the_key(lib_copy, file, old, new):
    before = artifacts.code_fingerprint(lib_copy)
    _edit(lib_copy / file, old, new)
    if file.endswith(".yaml"):  # same parsed content: same key; a changed value changes it
        assert artifacts.code_fingerprint(lib_copy) == before
        _edit(lib_copy / file, "steps:   300", "steps: 301")
    assert artifacts.code_fingerprint(lib_copy) != before


def test_cache_keys_carry_the_fingerprint(monkeypatch):
    key = artifacts.cache_key(kind="probe")
    monkeypatch.setattr(artifacts, "lib_fingerprint", lambda: "0" * 16)
    assert artifacts.cache_key(kind="probe") != key
