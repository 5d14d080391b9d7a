"""Chapters write nothing to stderr, even on a loaded machine with cold artifacts.

Anything on a notebook's stderr becomes a stored output, and nbval fails when it appears on one host and not
another (it happened once to chapter 01's first evaluation cell on a 2-core AMD EPYC host). This runs that cell the
way the runner does (a kernel, the chapter's own set-up cell, small parameters), in a fresh artifacts folder, while
two busy processes hold both cores, with ipykernel's capture of the file descriptors on (as under papermill), and
adds a cell that raises a warning and logs through transformers and torch: all of it must reach the chapter's log
(``bookkit.chapter_log.log_to_file``), none of it stderr.
"""

import copy
import os
import subprocess
import sys

import nbformat
from nbclient import NotebookClient

from lib.artifacts import ARTIFACTS_ENV, REPO_ROOT
from bookkit.runner import KERNEL_NAME
from lib.progress import PROGRESS_ENV

CHAPTER = REPO_ROOT / "book" / "01_organisms.ipynb"
SMALL = 'variants = ["ssft"]\nn_test = 2\nmax_new_tokens = 4\nbatch_size = 2'
NOISE = """import logging, warnings
from transformers.utils import logging as hf_logging
warnings.warn("probe: a warning", UserWarning)
hf_logging.get_logger("transformers.generation").warning("probe: a transformers log line")
logging.getLogger("torch").warning("probe: a torch log line")"""


def chapter_cells() -> list:
    """The chapter's parameters, small overrides, its set-up cell and its first evaluation cell (the first that
    loads a model and generates), outputs cleared."""
    code = [c for c in nbformat.read(CHAPTER, as_version=4).cells if c.cell_type == "code"]
    parameters = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    setup = next(c for c in code if "check(globals()" in c.source)
    evaluation = next(c for c in code if "evaluation.evaluate_pairs" in c.source)
    cells = [copy.deepcopy(parameters), nbformat.v4.new_code_cell(SMALL), copy.deepcopy(setup),
             copy.deepcopy(evaluation), nbformat.v4.new_code_cell(NOISE)]
    for cell in cells:
        cell.outputs = []
    return cells


def test_the_first_evaluation_cell_writes_nothing_to_stderr_under_load(tmp_path):
    nb = nbformat.v4.new_notebook(cells=chapter_cells())
    env = {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}  # fd capture on
    env.update({ARTIFACTS_ENV: str(tmp_path / "artifacts"), PROGRESS_ENV: "0",
                "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), env.get("PYTHONPATH"))))})
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        NotebookClient(nb, timeout=900, kernel_name=KERNEL_NAME,
                       resources={"metadata": {"path": str(CHAPTER.parent)}}).execute(env=env)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    stderr = [(i, o.text) for i, c in enumerate(nb.cells) for o in c.outputs
              if o.output_type == "stream" and o.name == "stderr"]
    assert stderr == []
    assert any("rates" in str(o.get("data", "")) or o.output_type == "execute_result" for o in nb.cells[3].outputs)
    log = (tmp_path / "artifacts" / "logs" / "01_organisms.log").read_text()
    assert all(f"probe: {what}" in log for what in ("a warning", "a transformers log line", "a torch log line"))
