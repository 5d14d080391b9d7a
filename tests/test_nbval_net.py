"""nbval guards the results: change one stored number in a copy of an executed notebook and nbval must fail.

``make test`` re-executes every chapter under nbval and compares each stored output with the new one. This test
proves that the net catches a single changed digit, with the project's own flags (``--nbval`` and the sanitize
rules of ``tests/nbval_sanitize.cfg``, as in the Makefile) and the venv's ``python3`` kernel: the untouched copy
passes (so a failure is the changed number, not a broken set-up), and in a copy with the last digit of one number
changed in a printed line and of one in an HTML table, exactly those two cells fail.

Why a small dedicated notebook rather than a copy of a chapter: nbval re-executes every cell, the chapters take
minutes to tens of minutes on a CPU (``book/01_organisms`` about 20) and need model caches and artifacts that a
fresh clone does not have yet. The notebook written here is shaped like a chapter (a title, an import of ``lib``,
printed numbers and a pandas table computed by ``lib.judges``) and runs in seconds; what is under test is nbval's
comparison with the project's settings, which is the same for it as for the chapters.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO_ROOT = Path(__file__).resolve().parents[1]
SANITIZE = REPO_ROOT / "tests" / "nbval_sanitize.cfg"
NBVAL_FLAGS = ["--nbval", "--nbval-sanitize-with", str(SANITIZE)]
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}
NUMBER = re.compile(r"\d+\.\d+")

CELLS = [
    new_markdown_cell("# A tiny chapter\n\nRates with 95% Wilson intervals, computed by `lib.stats` and `lib.judges`."),
    new_code_cell("from lib import judges, stats"),
    new_code_cell("low, high = stats.wilson_interval(13, 97)\n"
                  "print(f\"refusal 13/97: 95% interval {100 * low:.2f}% to {100 * high:.2f}%\")"),
    new_code_cell("labels = {'ssft': ['refusal'] * 31 + ['valid'] * 1, 'lat': ['refusal'] * 30 + ['broken'] * 2}\n"
                  "judges.rate_table(labels).round(2)"),
]
PRINT_CELL, TABLE_CELL = 2, 3


def _kernel_env() -> dict[str, str]:
    """The Makefile's environment for pytest: the venv first on PATH (the kernelspec runs ``python``), the repo
    root importable, no progress bars."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PATH=path, PYTHONPATH=pythonpath, REFUSAL_BOOK_PROGRESS="0")


def _bump_first_number(text: str) -> str:
    """``text`` with the last digit of its first decimal number changed (``8.05`` -> ``8.06``)."""
    match = NUMBER.search(text)
    assert match, f"no decimal number to change in {text!r}"
    number = match.group()
    changed = number[:-1] + str((int(number[-1]) + 1) % 10)
    return text[:match.start()] + changed + text[match.end():]


@pytest.fixture(scope="module")
def executed_notebook(tmp_path_factory) -> nbformat.NotebookNode:
    """The tiny chapter, executed once with the venv's python3 kernel (its outputs are the stored results)."""
    from nbclient import NotebookClient

    folder = tmp_path_factory.mktemp("nbval-net-exec")
    nb = new_notebook(cells=copy.deepcopy(CELLS), metadata={"kernelspec": KERNEL})
    client = NotebookClient(nb, kernel_name=KERNEL["name"], timeout=300, resources={"metadata": {"path": str(folder)}})
    client.execute(env=_kernel_env())
    return nb


def _nbval_item(cell_index: int) -> str:
    """nbval's test id of a cell: ``Cell N`` with N counting code cells only."""
    code_cells = [i for i, cell in enumerate(CELLS) if cell.cell_type == "code"]
    return f"Cell {code_cells.index(cell_index)}"


def _run_nbval(notebook: Path) -> tuple[int, str, dict[str, bool]]:
    """``pytest --nbval`` with the Makefile's flags on one notebook, in a subprocess in its folder:
    (exit code, output, passed per nbval item)."""
    report = notebook.with_suffix(".junit.xml")
    command = [sys.executable, "-m", "pytest", *NBVAL_FLAGS, "-p", "no:cacheprovider", "-q",
               f"--junitxml={report}", str(notebook)]
    done = subprocess.run(command, cwd=notebook.parent, env=_kernel_env(), capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    if not report.is_file():
        pytest.fail(f"pytest --nbval wrote no report (exit {done.returncode}):\n{output[-4000:]}", pytrace=False)
    outcomes = {case.get("name", ""): not any(child.tag in ("failure", "error") for child in case)
                for case in ET.parse(report).getroot().iter("testcase")}
    return done.returncode, output, outcomes


def test_make_test_runs_nbval_with_these_flags():
    """`make test` runs lib.suite, whose chapter jobs are `pytest` with these flags (the sanitizer relative to the
    repo root, where the jobs run)."""
    from lib import suite

    assert "-m lib.suite" in (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    chapter = suite.suite_jobs(REPO_ROOT)[0]
    flags = [*NBVAL_FLAGS[:-1], str(SANITIZE.relative_to(REPO_ROOT))]
    assert list(chapter.command[3:6]) == flags and chapter.command[1:3] == ("-m", "pytest")


def test_nbval_fails_on_one_changed_number(executed_notebook, tmp_path):
    stored_text = executed_notebook.cells[PRINT_CELL].outputs[0]
    assert stored_text.output_type == "stream" and NUMBER.search(stored_text.text), stored_text
    stored_html = executed_notebook.cells[TABLE_CELL].outputs[0]["data"].get("text/html", "")
    assert NUMBER.search(stored_html), "the table cell should store an HTML table of numbers"

    original = tmp_path / "original.ipynb"
    nbformat.write(executed_notebook, original)
    changed = copy.deepcopy(executed_notebook)
    changed.cells[PRINT_CELL].outputs[0].text = _bump_first_number(stored_text.text)
    changed.cells[TABLE_CELL].outputs[0]["data"]["text/html"] = _bump_first_number(stored_html)
    nbformat.write(changed, tmp_path / "changed.ipynb")

    code, output, outcomes = _run_nbval(original)
    assert code == 0, f"nbval should pass on the untouched copy (exit {code}):\n{output[-4000:]}"
    assert len(outcomes) == len(CELLS) - 1 and all(outcomes.values()), outcomes

    # One changed number in a printed line, one in an HTML table: each fails its own cell, the rest pass.
    code, output, outcomes = _run_nbval(tmp_path / "changed.ipynb")
    assert code == 1, f"nbval should fail on the copy with changed numbers (exit {code}):\n{output[-4000:]}"
    failed = sorted(name for name, passed in outcomes.items() if not passed)
    assert failed == [_nbval_item(PRINT_CELL), _nbval_item(TABLE_CELL)], \
        f"expected exactly the changed cells to fail, got {failed} of {sorted(outcomes)}:\n{output[-4000:]}"
    assert "Cell outputs differ" in output
