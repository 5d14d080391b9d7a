"""The whole test suite as `make test` runs it: the unit tests and nbval of every chapter, on lanes.

``python -m bookkit.suite [--jobs N|auto] [--chapters-only] [PYTEST ARGS ...]``

Each chapter is one pytest job (``pytest --nbval`` of its notebook) that starts once the chapters it reads have
passed (``bookkit.chapters.chapter_needs``), so on 2 lanes the organisms chapter runs beside the activation-direction
pipeline, and a free lane takes the ready job that most jobs wait for (``SUITE_START``); the unit tests are two more
jobs that nothing waits for, so that either lane can take either when no chapter is ready: the rehearsal of the
paper's profile on a stand-in (``tests/bookkit/test_rehearsal.py``) and the rest. Extra arguments go to every pytest
job. The exit status is 0 only when every job passed; a chapter whose need failed is reported as not run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.artifacts import REPO_ROOT
from bookkit.chapters import chapter_key, chapter_needs, read_toc_notebooks
from bookkit.lanes import Job, exit_code, lane_count, python_command, run_jobs, summary


SANITIZE = "tests/nbval_sanitize.cfg"
# nbval of a chapter: its stored outputs compared with numbers as numbers (bookkit.nbval_numbers), after the
# sanitize rules.
NBVAL_FLAGS = ("--nbval", "-p", "bookkit.nbval_numbers", "--nbval-sanitize-with", SANITIZE)
UNIT_TESTS = "unit tests"
REHEARSAL = "tests/bookkit/test_rehearsal.py"
UNIT_JOBS = (UNIT_TESTS, REHEARSAL)
# Which ready job a free lane takes: the one most jobs wait for, so that the chapters on the longest chain (the
# transfer chapter, then the judge audit) are never queued behind the unit tests or a chapter nothing waits for
# (BENCHMARKS.md, "The suite").
SUITE_START = "dependents"


def suite_jobs(repo_root: Path = REPO_ROOT, chapters_only: bool = False, pytest_args: tuple[str, ...] = ()
               ) -> list[Job]:
    """nbval of every chapter of ``_toc.yml`` (in its order, each needing what it reads), then the unit tests in two
    jobs (``UNIT_JOBS``)."""
    needs = chapter_needs(read_toc_notebooks(repo_root))
    jobs = [Job(chapter_key(nb, repo_root),
                python_command("-m", "pytest", *NBVAL_FLAGS, *pytest_args,
                               nb.relative_to(repo_root).as_posix()),
                tuple(chapter_key(need, repo_root) for need in needed))
            for nb, needed in needs.items()]
    if not chapters_only:
        jobs.append(Job(UNIT_TESTS, python_command("-m", "pytest", *pytest_args, "--ignore", REHEARSAL, "tests")))
        jobs.append(Job(REHEARSAL, python_command("-m", "pytest", *pytest_args, REHEARSAL)))
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bookkit.suite", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="auto", metavar="N",
                        help="lanes: an integer or 'auto' (default: 2 on a CPU with 2 or more cores, 1 with a GPU)")
    parser.add_argument("--chapters-only", action="store_true", help="nbval of the chapters, without the unit tests")
    args, pytest_args = parser.parse_known_args(argv)
    try:
        lanes = lane_count(args.jobs)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    outcome = run_jobs(suite_jobs(REPO_ROOT, args.chapters_only, tuple(pytest_args)), lanes, cwd=str(REPO_ROOT),
                       echo=lambda line: print(line, flush=True), first=SUITE_START)
    print(summary(outcome), flush=True)
    return exit_code(outcome)


if __name__ == "__main__":
    raise SystemExit(main())
