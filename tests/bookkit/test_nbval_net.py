"""nbval guards the results: change stored outputs in a copy of an executed notebook and nbval must tell a host's
last-digit noise from a wrong answer.

``make test`` re-executes every chapter under nbval and compares each stored output with the new one, numbers as
numbers (``bookkit.nbval_numbers``). These tests run that net with the project's own flags (``bookkit.suite``'s
``NBVAL_FLAGS``: the plugin and the sanitize rules of ``tests/nbval_sanitize.cfg``) and the venv's ``python3``
kernel: the untouched copy passes (so a failure is the change, not a broken set-up); a copy whose printed number,
table number and chart value each moved by one unit in their last digit (what another CPU generation prints)
passes; and in a copy with a number five units off, a changed verdict word and a sign-flipped chart, exactly those
three cells fail.

Why a small dedicated notebook rather than a copy of a chapter: nbval re-executes every cell, the chapters take
minutes to tens of minutes on a CPU (``book/01_organisms`` about 20) and need model caches and artifacts that a
fresh clone does not have yet. The notebook written here is shaped like a chapter (a title, an import of ``lib``,
printed numbers and a pandas table computed by ``lib.judges``) and runs in seconds; what is under test is nbval's
comparison with the project's settings, which is the same for it as for the chapters.
"""

from __future__ import annotations

import copy
import os
from decimal import Decimal
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from bookkit import suite

REPO_ROOT = Path(__file__).resolve().parents[2]
SANITIZE = REPO_ROOT / "tests" / "nbval_sanitize.cfg"
NBVAL_FLAGS = [str(SANITIZE) if flag == suite.SANITIZE else flag for flag in suite.NBVAL_FLAGS]
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}
NUMBER = re.compile(r"\d+\.\d+")
CHART_VALUE = re.compile(r'"cosine":(-?\d+\.\d+)')

CELLS = [
    new_markdown_cell("# A tiny chapter\n\nRates with 95% Wilson intervals, computed by `lib.stats` and `lib.judges`."),
    new_code_cell("from lib import judges, stats"),
    new_code_cell("low, high = stats.wilson_interval(13, 97)\n"
                  "print(f\"refusal 13/97: 95% interval {100 * low:.2f}% to {100 * high:.2f}%\")"),
    new_code_cell("labels = {'ssft': ['refusal'] * 31 + ['valid'] * 1, 'lat': ['refusal'] * 30 + ['broken'] * 2}\n"
                  "judges.rate_table(labels).round(2)"),
    new_code_cell("import pandas as pd\nfrom lib import viz\nviz.enable_offline_renderer()\n"
                  "frame = pd.DataFrame({'layer': [0, 1, 2], 'cosine': [0.985, 0.977, 0.5], 'variant': 'lat'})\n"
                  "viz.lines_chart(frame, 'layer', 'cosine', 'variant', 'cosine with SSFT')"),
]
PRINT_CELL, TABLE_CELL, CHART_CELL = 2, 3, 4


def _kernel_env() -> dict[str, str]:
    """The Makefile's environment for pytest: the venv first on PATH (the kernelspec runs ``python``), the repo
    root importable, no progress bars."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PATH=path, PYTHONPATH=pythonpath, REFUSAL_BOOK_PROGRESS="0")


def _shift_first_number(text: str, units: int) -> str:
    """``text`` with its first decimal number moved by ``units`` units in its last digit (``8.05``, 1 -> ``8.06``)."""
    match = NUMBER.search(text)
    assert match, f"no decimal number to change in {text!r}"
    number = Decimal(match.group())
    changed = number + units * Decimal(1).scaleb(number.as_tuple().exponent)
    return text[:match.start()] + str(changed) + text[match.end():]


def _chart_values(html: str, change) -> str:
    """A chart's HTML with every ``cosine`` value in its data replaced by ``change(value)``."""
    return CHART_VALUE.sub(lambda m: f'"cosine":{change(float(m.group(1)))}', html)


def _copy_with(notebook, print_text, table_html, chart_html) -> nbformat.NotebookNode:
    changed = copy.deepcopy(notebook)
    changed.cells[PRINT_CELL].outputs[0].text = print_text(changed.cells[PRINT_CELL].outputs[0].text)
    table = changed.cells[TABLE_CELL].outputs[0]["data"]
    table["text/html"] = table_html(table["text/html"])
    chart = changed.cells[CHART_CELL].outputs[0]["data"]
    chart["text/html"] = chart_html(chart["text/html"])
    return changed


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
    """`make test` runs bookkit.suite, whose chapter jobs are `pytest` with these flags (the sanitizer relative to the
    repo root, where the jobs run)."""
    from bookkit import suite

    assert "-m bookkit.suite" in (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    chapter = suite.suite_jobs(REPO_ROOT)[0]
    flags = list(suite.NBVAL_FLAGS)
    assert list(chapter.command[3:3 + len(flags)]) == flags and chapter.command[1:3] == ("-m", "pytest")
    assert "bookkit.nbval_numbers" in flags


def test_nbval_passes_last_digit_noise_and_fails_wrong_answers(executed_notebook, tmp_path):
    stored_text = executed_notebook.cells[PRINT_CELL].outputs[0]
    assert stored_text.output_type == "stream" and NUMBER.search(stored_text.text), stored_text
    stored_html = executed_notebook.cells[TABLE_CELL].outputs[0]["data"].get("text/html", "")
    assert NUMBER.search(stored_html) and "refusal" in stored_html, "the table cell should store an HTML table"
    stored_chart = executed_notebook.cells[CHART_CELL].outputs[0]["data"].get("text/html", "")
    assert len(CHART_VALUE.findall(stored_chart)) == 3, "the chart cell should store a chart of three cosines"

    nbformat.write(executed_notebook, tmp_path / "original.ipynb")
    code, output, outcomes = _run_nbval(tmp_path / "original.ipynb")
    assert code == 0, f"nbval should pass on the untouched copy (exit {code}):\n{output[-4000:]}"
    assert len(outcomes) == len(CELLS) - 1 and all(outcomes.values()), outcomes

    # What another CPU generation prints: each number one unit off in its last digit.
    noise = _copy_with(executed_notebook, lambda t: _shift_first_number(t, 1), lambda h: _shift_first_number(h, -1),
                       lambda h: _chart_values(h, lambda v: round(v - 0.001, 3)))
    nbformat.write(noise, tmp_path / "noise.ipynb")
    code, output, outcomes = _run_nbval(tmp_path / "noise.ipynb")
    assert code == 0, f"nbval should pass last-digit noise (exit {code}):\n{output[-4000:]}"

    # Wrong answers: a number five units off, a changed verdict word, a sign-flipped chart.
    wrong = _copy_with(executed_notebook, lambda t: _shift_first_number(t, 5),
                       lambda h: h.replace("refusal", "compliance", 1), lambda h: _chart_values(h, lambda v: -v))
    nbformat.write(wrong, tmp_path / "wrong.ipynb")
    code, output, outcomes = _run_nbval(tmp_path / "wrong.ipynb")
    assert code == 1, f"nbval should fail on the copy with wrong answers (exit {code}):\n{output[-4000:]}"
    failed = sorted(name for name, passed in outcomes.items() if not passed)
    assert failed == sorted(_nbval_item(c) for c in (PRINT_CELL, TABLE_CELL, CHART_CELL)), \
        f"expected exactly the changed cells to fail, got {failed} of {sorted(outcomes)}:\n{output[-4000:]}"
    assert "Cell outputs differ" in output and "beyond one unit in its last printed digit" in output
    assert "beyond the chart tolerance" in output
