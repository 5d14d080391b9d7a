"""bookkit.lanes (dependent jobs on worker lanes), the chapters' declared needs, and the suite `make test` runs."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from bookkit import chapters, lanes, runner, suite
from lib.artifacts import REPO_ROOT


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


# A job that appends its second argument to the file named by its first: the order in which jobs ran.
APPEND = "import sys, pathlib; p = pathlib.Path(sys.argv[1]); p.write_text((p.read_text() if p.exists() else '') + sys.argv[2])"


def _write(path: Path, text: str) -> str:
    return f"import pathlib; pathlib.Path({str(path)!r}).write_text({text!r})"


def test_a_job_starts_after_its_needs_and_beside_the_others(tmp_path):
    """'late' needs 'slow'; 'quick' needs nothing and runs beside 'slow' on the second lane, so it ends first."""
    order = tmp_path / "order"
    jobs = [lanes.Job("slow", (*_python(f"import time; time.sleep(1.5); {APPEND}"), str(order), "s")),
            lanes.Job("late", (*_python(APPEND), str(order), "l"), needs=("slow",)),
            lanes.Job("quick", (*_python(APPEND), str(order), "q"))]
    lines = []
    assert lanes.run_jobs(jobs, 2, echo=lines.append) == {"quick": "passed", "slow": "passed", "late": "passed"}
    assert order.read_text() == "qsl"
    assert lines[0] == f"3 job(s) on 2 lane(s), {lanes.lane_environment(2)['OMP_NUM_THREADS']} thread(s) each"


def test_ready_jobs_start_in_listed_order_or_most_awaited_first(tmp_path):
    """On one lane: 'quick' is listed first and nothing waits for it; 'root' unblocks 'leaf' and 'tail'."""
    order = tmp_path / "order"
    jobs = [lanes.Job("quick", (*_python(APPEND), str(order), "q")),
            lanes.Job("root", (*_python(APPEND), str(order), "r")),
            lanes.Job("leaf", (*_python(APPEND), str(order), "l"), needs=("root",)),
            lanes.Job("tail", (*_python(APPEND), str(order), "t"), needs=("leaf", "quick"))]
    assert lanes.dependent_counts(jobs) == {"quick": 1, "root": 2, "leaf": 1, "tail": 0}
    assert [job.name for job in lanes.start_order(jobs, "dependents")] == ["root", "quick", "leaf", "tail"]
    for first, expected in (("listed", "qrlt"), ("dependents", "rqlt")):
        order.unlink(missing_ok=True)
        assert lanes.exit_code(lanes.run_jobs(jobs, 1, first=first, echo=lambda line: None)) == 0
        assert order.read_text() == expected, first
    with pytest.raises(ValueError, match="first must be one of"):
        lanes.start_order(jobs, "fastest")


def test_a_failed_job_stops_what_needs_it_and_its_output_is_printed_whole(tmp_path):
    jobs = [lanes.Job("broken", _python("print('one'); print('two'); raise SystemExit(3)")),
            lanes.Job("after", _python(_write(tmp_path / "ran", "x")), needs=("broken",)),
            lanes.Job("other", _python("print('fine')"))]
    lines = []
    outcome = lanes.run_jobs(jobs, 2, echo=lines.append)
    assert outcome == {"broken": "failed (exit 3)", "other": "passed", "after": "not run: needs broken"}
    assert not (tmp_path / "ran").exists()
    assert any(line.startswith("[broken] failed (exit 3) in ") and line.endswith("\none\ntwo") for line in lines)
    assert lanes.exit_code(outcome) == 1 and lanes.summary(outcome).endswith("1/3 job(s) passed")


def test_each_lane_gets_its_share_of_the_cores_unless_the_caller_chose():
    assert lanes.lane_environment(2, {}, cores=2) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert lanes.lane_environment(2, {}, cores=8)["OMP_NUM_THREADS"] == "4"
    assert lanes.lane_environment(2, {"OMP_NUM_THREADS": "3"}, cores=8)["OMP_NUM_THREADS"] == "3"
    assert lanes.lane_environment(1, {}, cores=8) == {}
    assert lanes.lane_count("auto", cores=2, gpu=False) == 2
    assert lanes.lane_count("auto", cores=1, gpu=False) == lanes.lane_count("auto", cores=16, gpu=True) == 1
    assert lanes.lane_count("3") == 3
    for bad in ("0", "two", -1):
        with pytest.raises(ValueError, match="jobs must be 'auto' or an integer >= 1"):
            lanes.lane_count(bad)


def test_a_plan_must_list_needs_first():
    with pytest.raises(ValueError, match=r"job 'b' needs \['a'\], which no job listed before it"):
        lanes.check_jobs([lanes.Job("b", ("true",), ("a",)), lanes.Job("a", ("true",))])
    with pytest.raises(ValueError, match="listed twice"):
        lanes.check_jobs([lanes.Job("a", ("true",)), lanes.Job("a", ("true",))])


def _chapter(path: Path, source: str, needs: list[str] | None = None) -> Path:
    nb = new_notebook(cells=[new_code_cell(source)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if needs is not None:
        nb.metadata[chapters.NEEDS_KEY] = {"needs": needs}
    nbformat.write(nb, path)
    return path


def _toc(root: Path, stems: list[str]) -> None:
    (root / "book").mkdir(exist_ok=True)
    (root / "book" / "intro.md").write_text("# Intro\n")
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n"
                                   + "".join(f"  - file: book/{stem}\n" for stem in stems))


def test_a_chapter_needs_what_it_declares_or_else_every_chapter_before_it(tmp_path):
    _toc(tmp_path, ["a", "b", "c"])
    a = _chapter(tmp_path / "book" / "a.ipynb", "x = 1", [])
    b = _chapter(tmp_path / "book" / "b.ipynb", "x = 2", [])
    c = _chapter(tmp_path / "book" / "c.ipynb", "x = 3")
    assert chapters.chapter_needs(chapters.read_toc_notebooks(tmp_path)) == {a: [], b: [], c: [a, b]}
    _chapter(b, "x = 2", ["c"])
    with pytest.raises(ValueError, match=r"b\.ipynb: metadata refusal_book\.needs names \['c'\], which are not "
                                         r"chapters before it"):
        chapters.chapter_needs(chapters.read_toc_notebooks(tmp_path))


def test_the_books_needs_name_earlier_chapters_and_the_suite_checks_them_all():
    notebooks = chapters.read_toc_notebooks(REPO_ROOT)
    needs = chapters.chapter_needs(notebooks)
    assert needs[notebooks[-1]] == notebooks[:-1], "the conclusions read every chapter's verdicts"
    jobs = suite.suite_jobs(REPO_ROOT)
    chapter_jobs, unit_jobs = jobs[:-2], jobs[-2:]
    assert [job.name for job in chapter_jobs] == [chapters.chapter_key(nb, REPO_ROOT) for nb in notebooks]
    assert all(job.command[-1] == f"book/{Path(job.name).name}.ipynb" for job in chapter_jobs)
    assert [job.name for job in unit_jobs] == list(suite.UNIT_JOBS) and not any(job.needs for job in unit_jobs)
    assert unit_jobs[0].command[-3:] == ("--ignore", suite.REHEARSAL, "tests")  # every test file, in one job or the other
    assert unit_jobs[1].command[-1] == suite.REHEARSAL and (REPO_ROOT / suite.REHEARSAL).is_file()
    lanes.check_jobs(jobs)
    assert [job.name for job in suite.suite_jobs(REPO_ROOT, chapters_only=True)] == [job.name for job in chapter_jobs]
    order = [job.name for job in lanes.start_order(jobs, suite.SUITE_START)]
    assert order.index("book/06_transfer") < order.index("book/05_anatomy")  # the long chain's chapter first
    assert order[-2:] == list(suite.UNIT_JOBS)  # the unit tests take a lane only when no chapter is ready


def test_the_suite_passes_its_start_order_to_the_lanes(monkeypatch):
    seen = {}

    def run_jobs(jobs, lanes_, **kwargs):
        seen.update(kwargs)
        return {job.name: lanes.PASSED for job in jobs}

    monkeypatch.setattr(suite, "run_jobs", run_jobs)
    assert suite.main(["--jobs", "2", "--chapters-only"]) == 0
    assert seen["first"] == suite.SUITE_START == "dependents"


def test_runner_runs_chapters_on_lanes_and_a_failure_stops_the_chapters_that_need_it(tmp_path, monkeypatch, capsys):
    """Two independent chapters run side by side; the third reads the first's file; a broken first chapter leaves
    the third unrun and every notebook as it was."""
    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path / "artifacts"))
    _toc(tmp_path, ["first", "second", "third"])
    shared = tmp_path / "shared.txt"
    first = _chapter(tmp_path / "book" / "first.ipynb", _write(shared, "from first"), [])
    _chapter(tmp_path / "book" / "second.ipynb", "import os\nprint(os.environ['OMP_NUM_THREADS'])", [])
    third = _chapter(tmp_path / "book" / "third.ipynb", f"print(open({str(shared)!r}).read())", ["first"])
    (tmp_path / "params").mkdir()
    profile = tmp_path / "params" / "default.yaml"
    profile.write_text("defaults: {}\n")
    runner.run_profile(profile, repo_root=tmp_path, jobs=2)
    assert nbformat.read(third, as_version=4).cells[0].outputs[0]["text"] == "from first\n"
    second = nbformat.read(tmp_path / "book" / "second.ipynb", as_version=4)
    assert second.cells[0].outputs[0]["text"] == lanes.lane_environment(2)["OMP_NUM_THREADS"] + "\n"
    assert "3/3 job(s) passed" in capsys.readouterr().out

    _chapter(first, "raise ValueError('boom')", [])
    before = third.read_bytes()
    with pytest.raises(runner.ChapterError, match=r"\['book/first', 'book/third'\] did not run to the end"):
        runner.run_profile(profile, repo_root=tmp_path, jobs=2)
    assert third.read_bytes() == before
    out = capsys.readouterr().out
    assert "[book/third] not run: needs book/first" in out and "boom" in out
    assert json.loads(first.read_text())["cells"][0]["outputs"] == []


def test_sigterm_stops_every_job_and_what_it_started_in_a_session_of_its_own(tmp_path):
    """A CI timeout sends SIGTERM to `make test`: the lanes stop their jobs and the jobs' kernels, which run in
    sessions of their own, instead of leaving them running."""
    import signal
    import subprocess
    import time

    import psutil

    pid_file = tmp_path / "grandchild.pid"
    job = ("import subprocess, sys, pathlib, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
           f"time.sleep(300)'], start_new_session=True); pathlib.Path({str(pid_file)!r}).write_text(str(p.pid)); "
           "time.sleep(300)")
    runner_code = ("import sys; from bookkit import lanes; "
                   f"lanes.run_jobs([lanes.Job('kernel-like', (sys.executable, '-c', {job!r}))], 2)")
    lanes_process = subprocess.Popen([sys.executable, "-c", runner_code], cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    grandchild = psutil.Process(int(pid_file.read_text()))
    lanes_process.send_signal(signal.SIGTERM)
    assert lanes_process.wait(timeout=60) == 128 + signal.SIGTERM
    try:
        grandchild.wait(timeout=20)
    except psutil.TimeoutExpired:
        grandchild.kill()
        pytest.fail("the job's grandchild outlived the lanes")


@pytest.mark.parametrize("grace_s", [0.0, 5.0])
def test_stop_tree_leaves_no_descendant_of_a_process_that_keeps_spawning(grace_s):
    """A parent that launches a session-leading child every millisecond or so (as a chapter's runner launches its
    kernel) is stopped with every descendant, at once (grace 0) or after SIGTERM: none is started between listing
    and signalling and left running as an orphan (listing first and then signalling left some, every time)."""
    import os
    import subprocess
    import time
    import uuid

    import psutil

    marker = f"stop-tree-{uuid.uuid4().hex}"
    spawner = ("import subprocess, time\n"
               "while True:\n"
               "    subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
               "    time.sleep(0.001)\n")
    parent = subprocess.Popen([sys.executable, "-c", spawner], env={**os.environ, "STOP_TREE_MARKER": marker})
    time.sleep(0.5)

    def marked():
        found = set()
        for process in psutil.process_iter():
            try:
                if process.environ().get("STOP_TREE_MARKER") == marker and process.status() != psutil.STATUS_ZOMBIE:
                    found.add(process.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    assert len(marked()) > 2
    lanes.stop_tree(parent.pid, grace_s=grace_s)
    parent.wait(timeout=30)
    left = marked()
    for pid in left:  # tidy up before failing
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    assert not left
