"""The book's chapters: the notebooks ``_toc.yml`` lists, in reading order, the profile key of each, and the plan
of which chapters a profile runs with which parameters, checked before anything runs (``bookkit.runner`` executes
it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bookkit.parameters import ParameterError, declared_in, validate
from bookkit.profiles import ProfileError, chapter_parameters, effective_parameters


def _toc_files(entry: Any) -> Iterator[str]:
    """Every page of a _toc.yml subtree (``root``, then ``file`` entries of parts/chapters/sections), in order."""
    if isinstance(entry, list):
        for item in entry:
            yield from _toc_files(item)
    elif isinstance(entry, dict):
        for key in ("root", "file"):
            if key in entry:
                yield str(entry[key])
        for key in ("parts", "chapters", "sections"):
            yield from _toc_files(entry.get(key, []))


def _resolve_toc_file(repo_root: Path, name: str) -> Path:
    path = repo_root / name
    if path.suffix in {".ipynb", ".md"}:
        if not path.is_file():
            raise FileNotFoundError(f"_toc.yml lists {name!r} but {path} does not exist")
        return path
    for suffix in (".ipynb", ".md"):
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"_toc.yml lists {name!r} but neither {name}.ipynb nor {name}.md exists under {repo_root}")


def read_toc_notebooks(repo_root: str | Path) -> list[Path]:
    """The ``.ipynb`` files of ``<repo_root>/_toc.yml`` in reading order (root first; Markdown pages skipped)."""
    repo_root = Path(repo_root).resolve()
    toc_path = repo_root / "_toc.yml"
    if not toc_path.is_file():
        raise FileNotFoundError(f"no _toc.yml in {repo_root}")
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8")) or {}
    if not isinstance(toc, dict) or "root" not in toc:
        raise ValueError(f"{toc_path} has no 'root' entry")
    notebooks: list[Path] = []
    for name in _toc_files(toc):
        path = _resolve_toc_file(repo_root, name)
        if path.suffix == ".ipynb" and path not in notebooks:
            notebooks.append(path)
    return notebooks


def chapter_key(notebook: Path, repo_root: str | Path) -> str:
    """Profile key of a chapter: its path without suffix, relative to the repo root (``book/02_activations``)."""
    return Path(notebook).resolve().relative_to(Path(repo_root).resolve()).with_suffix("").as_posix()


def plan_runs(profile: dict, notebooks: list[Path], repo_root: str | Path) -> list[tuple[Path, dict]]:
    """Validate ``profile`` against the notebooks' parameters cells; return (notebook, parameters) per chapter."""
    keys = {chapter_key(nb, repo_root): nb for nb in notebooks}
    declared = {key: declared_in(nb) for key, nb in keys.items()}
    defaults, chapters = profile["defaults"], profile["chapters"]

    skip = profile.get("skip", [])
    unknown_chapters = sorted((set(chapters) | set(skip)) - set(keys))
    if unknown_chapters:
        raise ProfileError(f"profile names chapter(s) {unknown_chapters} that are not notebooks in _toc.yml; "
                           f"chapters are {sorted(keys)}")
    for key, overrides in chapters.items():
        unknown = sorted(set(overrides) - set(declared[key]))
        if unknown:
            names = sorted(declared[key]) or "none (no cell tagged 'parameters')"
            raise ProfileError(f"{keys[key]}: unknown parameter(s) {unknown} in profile chapter {key!r}; "
                               f"the notebook declares: {names}")
    everywhere = set().union(*declared.values()) if declared else set()
    orphans = sorted(set(defaults) - everywhere)
    if orphans:
        raise ProfileError(f"profile defaults {orphans} are declared by no chapter's parameters cell; "
                           f"declared parameters are {sorted(everywhere)}")

    plan = [(nb, params) for key, nb in keys.items()
            if (params := chapter_parameters(profile, key, declared[key])) is not None]
    check_effective_parameters(plan, declared, repo_root)
    return plan


def check_effective_parameters(plan: list[tuple[Path, dict]], declared: dict[str, dict], repo_root) -> None:
    """Before anything runs: every chapter's effective parameters pass ``bookkit.parameters.check`` (allowed values,
    variants the family has), and the chapters that read prompts all read the same dataset."""
    datasets = {}
    for nb, params in plan:
        key = chapter_key(nb, repo_root)
        values = effective_parameters(params, declared[key])
        try:
            validate(values, nb.stem, tuple(declared[key]))
        except ParameterError as error:
            raise ProfileError(f"{key} would run with a bad parameter: {error} Set it in the profile under "
                               f"chapters: {key}.") from error
        if "dataset" in values:
            datasets[key] = values["dataset"]
    if len(set(datasets.values())) > 1:
        raise ProfileError(f"The chapters would read different datasets ({datasets}); set the same 'dataset' for "
                           "every chapter (e.g. under defaults).")


def select_chapters(plan: list[tuple[Path, dict]], only: list[str] | None, repo_root: str | Path,
                    skipped: list[str] = ()) -> list:
    """Keep the chapters named in ``only`` (chapter key, file name or stem), in table-of-contents order; a name the
    profile skips (``skipped``, chapter keys) is an error that says so."""
    if not only:
        return plan
    names = {}
    for nb, _ in plan:
        for name in (chapter_key(nb, repo_root), nb.name, nb.stem):
            names.setdefault(name, nb)
    unknown = [name for name in only if name not in names]
    skipped_here = [name for name in unknown if any(key == name or key.endswith("/" + Path(name).stem)
                                                    for key in skipped)]
    if skipped_here:
        raise ProfileError(f"--only {skipped_here}: the profile skips {'it' if len(skipped_here) == 1 else 'them'} "
                           f"(skip: {list(skipped)}); run it with a profile that does not, e.g. params/default.yaml")
    if unknown:
        raise ProfileError(f"--only {unknown}: no such chapter; chapters are "
                           f"{[chapter_key(nb, repo_root) for nb, _ in plan]}")
    wanted = {names[name] for name in only}
    return [(nb, params) for nb, params in plan if nb in wanted]


NEEDS_KEY = "refusal_book"  # notebook metadata: {"refusal_book": {"needs": ["02_activations", ...]}}


def chapter_needs(notebooks: list[Path]) -> dict[Path, list[Path]]:
    """The chapters each chapter reads the results of (its notebook metadata ``refusal_book.needs``: stems of earlier
    chapters), so that ``bookkit.lanes`` may run the others beside it; a chapter that declares nothing needs every
    chapter before it. A need that is not an earlier chapter is an error."""
    needs: dict[Path, list[Path]] = {}
    by_stem: dict[str, Path] = {}
    for nb in notebooks:
        declared = notebook_metadata(nb).get(NEEDS_KEY, {}).get("needs")
        if declared is None:
            needs[nb] = list(by_stem.values())
        else:
            unknown = [stem for stem in declared if stem not in by_stem]
            if unknown:
                raise ValueError(f"{nb}: metadata {NEEDS_KEY}.needs names {unknown}, which are not chapters before it "
                                 f"in _toc.yml; earlier chapters are {sorted(by_stem)}")
            needs[nb] = [by_stem[stem] for stem in declared]
        by_stem[nb.stem] = nb
    return needs


def notebook_metadata(notebook: Path) -> dict:
    """A notebook's top-level metadata."""
    return json.loads(Path(notebook).read_text(encoding="utf-8")).get("metadata", {})
