"""Run the book's chapters with papermill: in place for the book's own profile, else into artifacts/runs/<profile>/.

``python -m bookkit.runner --profile params/default.yaml [--only NAME ...] [--jobs N|auto] [--dry-run]``

Chapters are the notebooks listed in ``_toc.yml``, in its order; a profile (``params/*.yaml``, its format in
``bookkit.profiles``) sets their parameters.

The whole profile is checked against the notebooks' ``parameters`` cells before anything runs (``bookkit.profiles``).
Each chapter runs in its own folder with ``REFUSAL_BOOK_PROGRESS=0`` (no progress bars in stored outputs), the repo
root on ``PYTHONPATH`` and ``REFUSAL_BOOK_PROFILE`` naming the profile (its results are stored under the profile's
run name); volatile metadata is stripped. The book's own profile (``params/default.yaml``) atomically replaces the
chapter notebooks; any other profile writes its executed chapters to ``artifacts/runs/<profile>/`` (same relative
paths) and leaves the book untouched, unless ``--in-place`` is given (on a branch, to publish that run as the
site). A failing chapter leaves its output notebook untouched.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import papermill
from jupyter_client.manager import KernelManager

from lib.artifacts import REPO_ROOT, artifact_path
from bookkit.chapters import chapter_key, chapter_needs, plan_runs, read_toc_notebooks, select_chapters
from bookkit.lanes import Job, lane_count, not_passed, python_command, run_jobs, summary
from bookkit.parameters import chapter_log
from bookkit.profiles import PROFILE_ENV, ProfileError, load_profile, profile_name
from lib.progress import PROGRESS_ENV


KERNEL_NAME = "python3"


@functools.cache
def _socket_folder() -> str:
    """A private temporary folder for this process's kernel sockets, made at the first kernel start and removed
    when the process exits."""
    folder = tempfile.TemporaryDirectory(prefix="refusal-book-kernels-")
    atexit.register(folder.cleanup)
    return folder.name


class LocalKernelManager(KernelManager):
    """A kernel reached over local IPC sockets (POSIX) instead of TCP ports: ipykernel warns on the terminal about
    unencrypted TCP at every start, and a chapter has no business listening on the network. The sockets live in
    this process's private folder, not the chapter's: two runners on lanes would otherwise pick the same socket
    names in ``book/`` and talk to each other's kernels."""

    def __init__(self, **kwargs):
        if os.name == "posix":
            kwargs = {"transport": "ipc", "ip": os.path.join(_socket_folder(), "kernel"), **kwargs}
        super().__init__(**kwargs)

    async def _async_interrupt_kernel(self) -> None:
        # jupyter_client interrupts a kernel before shutting it down, to stop code still running. papermill shuts
        # the kernel down once the last cell has finished, and a SIGINT that lands while the kernel is still
        # handling its last message makes ipykernel print "ERROR | KeyboardInterrupt caught in kernel." on the
        # terminal. An idle kernel needs no interrupt: the shutdown request, then SIGTERM and SIGKILL, still follow.
        if self.shutting_down:
            return
        await super()._async_interrupt_kernel()
INJECTED_TAG = "injected-parameters"
# myst-nb renders a `hide-cell` cell as a collapsed toggle: readers can open it to see the effective parameters.
INJECTED_HIDE_TAG = "hide-cell"
INJECTED_CELL_ID = "injected-parameters"
# Output mimetypes that only point at live widget state (random model ids): meaningless once the kernel is gone.
WIDGET_MIMETYPES = {"application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json"}


class ChapterError(RuntimeError):
    """A chapter failed to execute; its notebook was left as it was."""


# --------------------------------------------------------------------------------------------------------------------
# Notebook clean-up
# --------------------------------------------------------------------------------------------------------------------


def strip_volatile_metadata(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove what changes from run to run: papermill's and nbclient's timings, widget state, empty tag lists.

    Also gives papermill's injected-parameters cell a fixed id (nbformat would give it a random one). Works in place
    and returns ``nb``.
    """
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        meta = cell.setdefault("metadata", nbformat.NotebookNode())
        meta.pop("papermill", None)
        meta.pop("execution", None)
        if meta.get("tags") == []:
            del meta["tags"]
        if INJECTED_TAG in meta.get("tags", []) and "id" in cell:
            cell["id"] = INJECTED_CELL_ID
        if cell.get("cell_type") == "code":
            kept = []
            for output in cell.get("outputs", []):
                data = output.get("data")
                if data is not None:
                    for mimetype in WIDGET_MIMETYPES & set(data):
                        del data[mimetype]
                    if not data:
                        continue
                kept.append(output)
            cell["outputs"] = kept
    return nb


def hide_injected_parameters(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Tag papermill's injected-parameters cell ``hide-cell``: collapsed in the book, one click to show."""
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if INJECTED_TAG in tags and INJECTED_HIDE_TAG not in tags:
            tags.append(INJECTED_HIDE_TAG)
    return nb


def _drop_injected_cells(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb.cells = [c for c in nb.cells if INJECTED_TAG not in c.get("metadata", {}).get("tags", [])]
    return nb


# --------------------------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _kernel_environment(repo_root: Path, profile: Path | None) -> Iterator[None]:
    """Environment inherited by the kernel: progress bars off, repo root importable (``import lib``), the profile
    it runs under (``bookkit.profiles.current_profile``)."""
    saved = {name: os.environ.get(name) for name in (PROGRESS_ENV, "PYTHONPATH", PROFILE_ENV)}
    os.environ[PROGRESS_ENV] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo_root), saved["PYTHONPATH"]) if p)
    if profile is not None:
        os.environ[PROFILE_ENV] = str(profile)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def slowest_cells(nb: nbformat.NotebookNode, top: int = 3) -> list[tuple[int, float, str]]:
    """The ``top`` code cells that took longest in papermill's timings: (cell index, seconds, first source line)."""
    timed = [(index, float(cell.metadata.get("papermill", {}).get("duration") or 0.0),
              cell.source.strip().splitlines()[0] if cell.source.strip() else "")
             for index, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    return sorted(timed, key=lambda row: -row[1])[:top]


def execute_chapter(notebook: str | Path, parameters: dict, repo_root: str | Path = REPO_ROOT,
                    output: str | Path | None = None, profile: str | Path | None = None
                    ) -> tuple[float, list[tuple[int, float, str]]]:
    """Execute one chapter in its folder and write the cleaned, executed notebook to ``output`` (default: replace
    the chapter itself); return wall seconds and its slowest cells (``slowest_cells``: where a chapter's time goes,
    before the timings are stripped). ``profile``: the profile file the chapter runs under (``$REFUSAL_BOOK_PROFILE``).

    On failure the output is left untouched, the temporary file is removed and :class:`ChapterError` is raised.
    """
    notebook = Path(notebook).resolve()
    repo_root = Path(repo_root).resolve()
    output = Path(output).resolve() if output is not None else notebook
    output.parent.mkdir(parents=True, exist_ok=True)
    name = chapter_key(notebook, repo_root)
    source = nbformat.read(notebook, as_version=4)
    if not parameters:
        # papermill injects nothing without parameters, so a cell left by an earlier run would be stale.
        _drop_injected_cells(source)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{notebook.stem}.", suffix=".running.ipynb", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    start = time.perf_counter()
    try:
        nbformat.write(source, tmp)
        with _kernel_environment(repo_root, None if profile is None else Path(profile).resolve()):
            # coalesce_streams: a print reaches the kernel's stdout as two writes (text, then "\n"), and under load
            # ipykernel's flush timer can fall between them, storing one line as two outputs (nbval merges them,
            # but the chapter file would differ from run to run).
            papermill.execute_notebook(
                str(tmp), str(tmp), parameters=parameters or None, kernel_name=KERNEL_NAME, progress_bar=False,
                request_save_on_cell_execute=False, cwd=str(notebook.parent), kernel_manager_class=LocalKernelManager,
                coalesce_streams=True,
            )
        executed = nbformat.read(tmp, as_version=4)
        slowest = slowest_cells(executed)
        hide_injected_parameters(strip_volatile_metadata(executed))
        nbformat.write(executed, tmp)
        os.chmod(tmp, stat.S_IMODE(notebook.stat().st_mode))  # mkstemp makes 0600 files; keep the notebook's mode
        os.replace(tmp, output)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ChapterError(f"chapter {name} ({notebook}) failed; {output} was left unchanged.\n{exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return time.perf_counter() - start, slowest


def output_folder(profile_path: str | Path, repo_root: str | Path, in_place: bool | None = None) -> Path:
    """Where the executed chapters go: the book itself for the book's own profile (``<repo_root>/params/default.yaml``)
    or with ``in_place``, else ``artifacts/runs/<profile name>/`` (the chapters' paths relative to the repo below
    it)."""
    repo_root = Path(repo_root).resolve()
    if in_place is None:
        in_place = Path(profile_path).resolve() == repo_root / "params" / "default.yaml"
    return repo_root if in_place else artifact_path("runs", profile_name(profile_path))


def chapter_jobs(plan: list[tuple[Path, dict]], notebooks: list[Path], profile_path: str | Path, repo_root: Path,
                 in_place: bool | None) -> list[Job]:
    """One ``python -m bookkit.runner --only CHAPTER`` job per planned chapter, needing the planned chapters it reads
    (``bookkit.chapters.chapter_needs`` of the book's ``notebooks``; a need outside the plan is taken as already run)."""
    planned = [nb for nb, _ in plan]
    needs = chapter_needs(notebooks)
    flags = ["--in-place"] if in_place else []
    return [Job(chapter_key(nb, repo_root),
                python_command("-m", "bookkit.runner", "--profile", str(Path(profile_path).resolve()), "--only",
                               chapter_key(nb, repo_root), "--root", str(repo_root), *flags),
                tuple(chapter_key(need, repo_root) for need in needs[nb] if need in planned))
            for nb in planned]


def run_profile(profile_path: str | Path, only: list[str] | None = None, dry_run: bool = False,
                repo_root: str | Path = REPO_ROOT, in_place: bool | None = None, jobs: str | int = 1
                ) -> list[tuple[Path, dict]]:
    """Validate the profile, then execute the selected chapters in order (or only print the plan), writing them to
    ``output_folder``. ``jobs`` > 1 (or "auto") runs chapters that do not need each other side by side, each in its
    own process with its share of the cores (``bookkit.lanes``); a failed chapter stops the chapters that need it."""
    repo_root = Path(repo_root).resolve()
    profile = load_profile(profile_path)
    notebooks = read_toc_notebooks(repo_root)
    plan = plan_runs(profile, notebooks, repo_root)
    plan = select_chapters(plan, only, repo_root, profile.get("skip", []))
    folder = output_folder(profile_path, repo_root, in_place)
    print(f"run {profile_name(profile_path)!r}: executed chapters go to "
          f"{'the book (in place)' if folder == repo_root else folder}", flush=True)
    lanes = lane_count(jobs)
    if lanes > 1 and not dry_run and len(plan) > 1:
        # The chapter that most chapters wait for starts first: 04 (directions) before 03 (spectra), 06 (transfer)
        # before 05 (anatomy), so the slow chapters overlap instead of queueing on one lane (BENCHMARKS.md).
        outcome = run_jobs(chapter_jobs(plan, notebooks, profile_path, repo_root, in_place), lanes,
                           cwd=str(repo_root), echo=lambda line: print(line, flush=True), first="dependents")
        print(summary(outcome), flush=True)
        failed = not_passed(outcome)
        if failed:
            raise ChapterError(f"chapter(s) {failed} did not run to the end; their notebooks were left unchanged "
                               "(the output above says why).")
        return plan
    total = time.perf_counter()
    for index, (nb, params) in enumerate(plan, start=1):
        key = chapter_key(nb, repo_root)
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "notebook defaults"
        if dry_run:
            print(f"[{index}/{len(plan)}] {key}: {shown}", flush=True)
            continue
        print(f"[{index}/{len(plan)}] {key}: running ({shown})", flush=True)
        seconds, slowest = execute_chapter(nb, params, repo_root, folder / nb.relative_to(repo_root), profile_path)
        cells = "; ".join(f"cell {i}: {t:.0f} s ({line[:60]})" for i, t, line in slowest if t >= 1)
        print(f"[{index}/{len(plan)}] {key}: done in {seconds:.1f} s" + (f"; slowest {cells}" if cells else ""),
              flush=True)
        log = chapter_log(nb.stem)
        if log.exists() and log.stat().st_size:
            print(f"[{index}/{len(plan)}] {key}: {len(log.read_text().splitlines())} line(s) of warnings or library "
                  f"logs in {log}", flush=True)
    if not dry_run:
        print(f"{len(plan)} chapter(s) in {time.perf_counter() - total:.1f} s", flush=True)
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bookkit.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help="profile YAML (e.g. params/default.yaml)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these chapters (book/02_activations, 02_activations.ipynb or 02_activations)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan without executing")
    parser.add_argument("--root", default=str(REPO_ROOT), help="book root holding _toc.yml (default: this repo)")
    parser.add_argument("--in-place", action="store_true",
                        help="replace the book's chapters even for a profile other than params/default.yaml "
                             "(default: such a profile writes to artifacts/runs/<profile>/)")
    parser.add_argument("--jobs", default="1", metavar="N",
                        help="chapters run side by side when they do not need each other: an integer or 'auto' "
                             "(2 lanes on 2 or more cores; default 1: one chapter at a time, as on a GPU)")
    args = parser.parse_args(argv)
    try:
        run_profile(args.profile, only=args.only, dry_run=args.dry_run, repo_root=args.root,
                    in_place=True if args.in_place else None, jobs=args.jobs)
    except (ProfileError, ChapterError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
