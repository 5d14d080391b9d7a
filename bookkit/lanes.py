"""Dependent jobs on a few worker lanes: `make book` and `make test` run the chapters that do not need each other at
the same time.

On a CPU one process at 2 threads leaves the cores idle part of the time (model loads, Python, the kernels' own
overheads), and torch's matrix products gain far less than twofold from a second thread, so two processes at 1
thread each do more work than one at 2 (see BENCHMARKS.md, "The suite"). A job is a command with the names of the
jobs it needs; a job starts once they have all passed, on the first free lane. Every job gets ``$OMP_NUM_THREADS``
and ``$MKL_NUM_THREADS`` set to its share of the cores (unless the caller set them), and its output is printed
whole when it ends, so lanes never interleave lines. A job whose need failed does not run.

Which ready job starts first on a free lane: ``first="listed"``, the one listed first (the caller's order), or
``first="dependents"``, the one that the most jobs wait for, directly or through others (ties: listed first). The
second keeps a lane from spending the start of a run on a job nothing waits for while the other lane's work piles
up behind a job that unblocks most of the plan.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import psutil
import torch


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
PASSED = "passed"


@dataclass(frozen=True)
class Job:
    """One command (an argv list) and the names of the jobs that must pass before it starts."""

    name: str
    command: tuple[str, ...]
    needs: tuple[str, ...] = ()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers set), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def lane_count(jobs: str | int, cores: int | None = None, gpu: bool | None = None) -> int:
    """``jobs`` as a number of lanes: an integer >= 1, or ``"auto"``: 2 on a CPU-only machine with 2 or more cores,
    else 1 (with a GPU the chapters run on it, one model in its memory at a time)."""
    if jobs == "auto":
        if gpu is None:

            gpu = torch.cuda.is_available()
        cores = available_cores() if cores is None else cores
        return 2 if cores >= 2 and not gpu else 1
    try:
        count = int(jobs)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise ValueError(f"jobs must be 'auto' or an integer >= 1, got {jobs!r}.")
    return count


def lane_environment(lanes: int, base: Mapping[str, str] | None = None, cores: int | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with each thread variable set to the lane's share of the
    cores, ``max(1, cores // lanes)``, where the caller has not set it; one lane changes nothing."""
    env = dict(os.environ if base is None else base)
    if lanes > 1:
        share = str(max(1, (available_cores() if cores is None else cores) // lanes))
        for name in THREAD_VARIABLES:
            env.setdefault(name, share)
    return env


def check_jobs(jobs: Sequence[Job]) -> None:
    """Every name is unique and every need names a job listed before it (so the plan has no cycle)."""
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"job {job.name!r} is listed twice.")
        unknown = [need for need in job.needs if need not in seen]
        if unknown:
            raise ValueError(f"job {job.name!r} needs {unknown}, which no job listed before it is named; list a "
                             "job after the jobs it needs.")
        seen.add(job.name)


def dependent_counts(jobs: Sequence[Job]) -> dict[str, int]:
    """How many jobs wait for each job, directly or through other jobs."""
    waiting: dict[str, set[str]] = {job.name: set() for job in jobs}
    for job in reversed(jobs):  # a job's dependents are listed after it, so they are complete when it is reached
        for need in job.needs:
            waiting[need] |= {job.name} | waiting[job.name]
    return {name: len(names) for name, names in waiting.items()}


START_ORDERS = ("listed", "dependents")


def start_order(jobs: Sequence[Job], first: str = "listed") -> list[Job]:
    """``jobs`` in the order in which ready ones are started (module docstring: ``first``)."""
    if first not in START_ORDERS:
        raise ValueError(f"first must be one of {START_ORDERS}, got {first!r}.")
    if first == "listed":
        return list(jobs)
    counts = dependent_counts(jobs)
    return sorted(jobs, key=lambda job: -counts[job.name])  # sorted() is stable: ties keep the listed order


def run_jobs(jobs: Sequence[Job], lanes: int, cwd: str | None = None, env: Mapping[str, str] | None = None,
             echo: Callable[[str], None] = print, poll_s: float = 0.2, first: str = "listed") -> dict[str, str]:
    """Run ``jobs`` on ``lanes`` lanes (``Job.needs`` respected; ready jobs start in ``start_order``); return each
    job's outcome, ``"passed"``, ``"failed (exit N)"`` or ``"not run: needs X"``. Ctrl-C or SIGTERM stops every
    running job and everything it started (kernels included)."""
    check_jobs(jobs)
    environment = lane_environment(lanes, env)
    pending, running, outcome = start_order(jobs, first), {}, {}
    threads = environment.get(THREAD_VARIABLES[0], "default")
    echo(f"{len(jobs)} job(s) on {lanes} lane(s), {threads} thread(s) each")
    with _terminate_raises():
        try:
            while pending or running:
                for job in list(pending):
                    failed = [n for n in job.needs if outcome.get(n, PASSED) != PASSED]
                    if failed:
                        outcome[job.name] = f"not run: needs {', '.join(failed)}"
                        pending.remove(job)
                        echo(f"[{job.name}] {outcome[job.name]}")
                for job in [j for j in pending if all(outcome.get(n) == PASSED for n in j.needs)]:
                    if len(running) >= lanes:
                        break
                    log = tempfile.TemporaryFile(mode="w+b")
                    process = subprocess.Popen(job.command, cwd=cwd, env=environment, stdout=log,
                                               stderr=subprocess.STDOUT)
                    running[job.name] = (process, log, time.perf_counter())
                    pending.remove(job)
                    echo(f"[{job.name}] started: {' '.join(job.command)}")
                for name, (process, log, start) in list(running.items()):
                    if process.poll() is None:
                        continue
                    del running[name]
                    outcome[name] = PASSED if process.returncode == 0 else f"failed (exit {process.returncode})"
                    log.seek(0)
                    text = log.read().decode(errors="replace").rstrip()
                    log.close()
                    seconds = time.perf_counter() - start
                    echo(f"[{name}] {outcome[name]} in {seconds:.0f} s" + (f"\n{text}" if text else ""))
                time.sleep(poll_s)
        except BaseException:
            for process, log, _ in running.values():
                stop_tree(process.pid)
                log.close()
            raise
    return outcome


def stop_tree(pid: int, grace_s: float = 10.0) -> None:
    """Terminate a process and all its descendants, killing what is left after ``grace_s`` (0: kill at once).

    Signalling the job's process group would leave a Jupyter kernel running (it runs in a session of its own), and
    listing the descendants and then signalling them would miss a kernel launched in between, left running as an
    orphan (seen in CI). So the tree is frozen first (``frozen_tree``), then signalled, then let go."""
    tree = frozen_tree(pid)
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate() if grace_s > 0 else process.kill()
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.resume()  # a stopped process acts on SIGTERM only once continued
    _, alive = psutil.wait_procs(tree, timeout=max(grace_s, 1.0))
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)


def frozen_tree(pid: int, timeout_s: float = 2.0) -> list:
    """``pid`` and every descendant, each stopped (SIGSTOP): parents are stopped before their children are listed,
    and the listing repeats until it finds no new process, so none can start another after the list is made."""
    try:
        tree = {pid: psutil.Process(pid)}
    except psutil.NoSuchProcess:
        return []
    stopped: set[int] = set()
    while set(tree) - stopped:
        for process_id in sorted(set(tree) - stopped):
            _stop(tree[process_id], timeout_s)
            stopped.add(process_id)
        for process in list(tree.values()):
            with contextlib.suppress(psutil.NoSuchProcess):
                tree.update((child.pid, child) for child in process.children())
    return list(tree.values())


def _stop(process, timeout_s: float) -> None:
    """SIGSTOP, then wait until the process is stopped: a fork it was making has finished, so its child is listed."""
    with contextlib.suppress(psutil.NoSuchProcess):
        process.suspend()
        deadline = time.perf_counter() + timeout_s
        while process.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) \
                and time.perf_counter() < deadline:
            time.sleep(0.01)


@contextlib.contextmanager
def _terminate_raises():
    """SIGTERM (a CI timeout, ``kill``) raises SystemExit in the main thread, so the jobs are stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def not_passed(outcome: Mapping[str, str]) -> list[str]:
    """The jobs that failed or did not run, in the outcome's order."""
    return [name for name, value in outcome.items() if value != PASSED]


def summary(outcome: Mapping[str, str]) -> str:
    """One line per job, then how many passed."""
    lines = [f"  {name}: {value}" for name, value in outcome.items()]
    return "\n".join([*lines, f"{len(outcome) - len(not_passed(outcome))}/{len(outcome)} job(s) passed"])


def exit_code(outcome: Mapping[str, str]) -> int:
    """0 when every job passed, else 1."""
    return 1 if not_passed(outcome) else 0


def python_command(*arguments: str) -> tuple[str, ...]:
    """This interpreter running ``arguments`` (``-m module ...``)."""
    return (sys.executable, *arguments)
