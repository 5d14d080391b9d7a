"""Paths, hashing, and atomically written safetensors artifacts with a JSON metadata sidecar.

Every artifact is a pair ``NAME.safetensors`` + ``NAME.json``. The sidecar is written last and records the SHA-256
of the tensor file and the cache key of everything that determined it, so a half-written or stale file is never
trusted: ``load_tensors`` verifies both and ``cached_tensors`` recomputes on any mismatch.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

import lib
from lib.packed import packed_setting


REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
ARTIFACTS_ENV = "REFUSAL_BOOK_ARTIFACTS"
CACHE_ENV = "REFUSAL_BOOK_CACHE"


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, corrupted or stale."""


class StaleArtifactError(ArtifactError):
    """An artifact is intact but was computed from other inputs (its cache key differs)."""


def artifacts_dir() -> Path:
    """Where chapters write their outputs: ``$REFUSAL_BOOK_ARTIFACTS`` or ``<repo>/artifacts``."""
    return Path(os.environ.get(ARTIFACTS_ENV, REPO_ROOT / "artifacts"))


ARTIFACT_KINDS = {  # every folder under artifacts/, what writes it (README, "Artifacts")
    "activations": "residual activations of the direction pairs, per variant (lib.capture.pair_activations)",
    "site-statistics": "per-site means and spreads over reference prompts (lib.capture.site_statistics)",
    "directions": "refusal directions and chosen layers, one file per family (lib.directions.save_directions)",
    "evaluations": "generated, judged completions per condition (lib.evaluation.evaluate, cached_generation)",
    "attacks": "completions under the organisms' PGD attack (lib.adversary.cached_attack)",
    "verdicts": "each chapter's verdict on a claim, per family and run, read by the conclusions (write_verdict)",
    "runs": "chapters executed under a profile other than the book's, per profile (bookkit.runner)",
    "logs": "warnings and library log lines raised while a chapter ran, one file per chapter (bookkit.chapter_log)",
    "checkpoints": "resumable training state of long runs, per variant and seed (lib.training_state; kept by make "
                   "clean, never committed)",
}


def artifact_path(kind: str, family: str, *parts: str, suffix: str = "") -> Path:
    """``artifacts/<kind>/<family>/<parts...>``, or ``artifacts/<kind>/<family><suffix>`` for a kind stored as one
    file per family: the one place artifact paths are built (``ARTIFACT_KINDS``)."""
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"Unknown artifact kind {kind!r}; kinds are {sorted(ARTIFACT_KINDS)}.")
    if suffix and parts:
        raise ValueError("artifact_path takes either parts (a folder per family) or a suffix (one file), not both.")
    return artifacts_dir().joinpath(kind, family + suffix, *parts)


def cache_dir() -> Path:
    """User cache for large derived files (dequantised weights): ``$REFUSAL_BOOK_CACHE`` or the XDG cache."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "refusal-lat-book"
    return Path(os.environ.get(CACHE_ENV, default))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


LIB_DIR = Path(lib.__file__).parent
# lib modules that compute nothing a cache stores: progress bars and charts
NOT_COMPUTING = frozenset({"progress.py", "viz.py"})


def _without_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` with the docstring of every module, class and function removed (comments are not in the AST)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                   str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def code_fingerprint(folder: str | Path = LIB_DIR) -> str:
    """A hash of the science code in ``folder`` (lib): every module's syntax tree without docstrings and comments,
    and every YAML file's parsed content. Any change to code that computes an artifact invalidates it, without
    anyone remembering to bump a version; a change to documentation, to the book's machinery (``bookkit``) or to
    ``NOT_COMPUTING`` keeps every stored result."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.suffix == ".py" and path.name not in NOT_COMPUTING:
            content = ast.dump(_without_docstrings(ast.parse(path.read_text(encoding="utf-8"))))
        elif path.suffix == ".yaml":
            content = json.dumps(yaml.safe_load(path.read_text(encoding="utf-8")), sort_keys=True, default=str)
        else:
            continue
        digest.update(path.name.encode() + b"\0" + content.encode() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def lib_fingerprint() -> str:
    """``code_fingerprint`` of lib, computed once per process (the modules it hashes are the ones imported)."""
    return code_fingerprint(LIB_DIR)


def cache_key(**parts: Any) -> str:
    """A stable hash of everything that determines an artifact, including lib's version and source code and where
    the products were oneDNN's packed ones (``lib.packed.packed_setting``: the last bits differ)."""
    payload = json.dumps({"lib_version": lib.__version__, "lib_code": lib_fingerprint(),
                          "packed_products": packed_setting(), **parts},
                         sort_keys=True, default=str)
    return sha256_text(payload)[:16]


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it into place only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def read_json(path: str | Path, fix: str, error: type[Exception] = None) -> Any:
    """The JSON document at ``path``; unreadable or malformed JSON raises ``error`` (default ``ArtifactError``)
    naming the file and ``fix`` (what the reader should do about it)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise (error or ArtifactError)(f"{path} is not valid JSON ({problem}). {fix}") from problem


def read_jsonl(path: str | Path, fix: str, error: type[Exception] = None) -> list[Any]:
    """One JSON value per non-blank line of ``path``; a malformed line raises ``error`` (default ``ArtifactError``)
    naming the file, the line and ``fix``."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as problem:
            raise (error or ArtifactError)(f"{path}, line {number}: not valid JSON ({problem.msg}). {fix}") \
                from problem
    return rows


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write ``tensors`` to ``path`` (safetensors) and then its sidecar; the sidecar is the commit marker."""
    path = Path(path)
    sidecar = sidecar_path(path)
    sidecar.unlink(missing_ok=True)  # an old sidecar must not vouch for a new, half-written tensor file
    with atomic_path(path) as tmp:
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(tmp))
    write_json(sidecar, {**metadata, "sha256": sha256_file(path), "tensors": sorted(tensors)})
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        raise ArtifactError(f"{path} has no metadata sidecar {sidecar.name}: it was never completed. "
                            "Re-run the chapter that writes it.")
    return read_json(sidecar, "Delete it and its tensor file and re-run the chapter that writes them.")


def load_tensors(path: str | Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load an artifact after checking its checksum (and its cache key, when given)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"Artifact {path} does not exist. Run the chapter that writes it first "
                            "(`make book` runs every chapter in order).")
    meta = read_metadata(path)
    if sha256_file(path) != meta.get("sha256"):
        raise ArtifactError(f"{path} does not match the checksum in {sidecar_path(path).name} (corrupted or "
                            "half-written). Delete both files and re-run the chapter that writes them.")
    if key is not None and meta.get("key") != key:
        raise StaleArtifactError(f"{path} was computed with different inputs (key {meta.get('key')} != {key}). "
                            "Re-run the chapter that writes it.")
    return load_file(str(path)), meta


def cached_tensors(path: str | Path, key: str, metadata: dict[str, Any],
                   compute: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return the artifact at ``path`` if it was computed under ``key``; otherwise compute and save it. A stale
    artifact (other inputs) is recomputed quietly; a corrupted or half-written one with a warning that says so."""
    path = Path(path)
    if path.exists() or sidecar_path(path).exists():
        try:
            return load_tensors(path, key)
        except StaleArtifactError:
            pass
        except ArtifactError:
            warnings.warn(f"The cached {path} is damaged or half-written; recomputing it.", stacklevel=2)
    save_tensors(path, compute(), {**metadata, "key": key})
    return load_tensors(path, key)


def cached_json(path: str | Path, key: str, compute: Callable[[], Any]) -> Any:
    """Return the JSON result stored at ``path`` under ``key``, or compute, store (atomically) and return it."""
    path = Path(path)
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            warnings.warn(f"{path} is not valid JSON ({error}); recomputing it.", stacklevel=2)
            stored = None
        if isinstance(stored, dict) and stored.get("key") == key:
            return stored["result"]
    result = compute()
    write_json(path, {"key": key, "lib_version": lib.__version__, "result": result})
    return result


def verdicts_dir() -> Path:
    return artifacts_dir() / "verdicts"


def write_verdict(run: str, family: str, claim: str, verdict: dict[str, Any]) -> Path:
    """Store a chapter's computed verdict on one of the paper's claims, for the conclusions chapter, under the run
    that made it (``bookkit.parameters.check``'s return: a profile name, or an ``adhoc-...`` run):
    ``artifacts/verdicts/<family>/<run>/<claim>.json``."""
    path = artifact_path("verdicts", family, run, f"{claim}.json")
    write_json(path, {"family": family, "claim": claim, "run": run, **verdict})
    return path


def read_verdicts(families: str | Sequence[str] = "all", runs: Sequence[str] = ("default",)) -> list[dict[str, Any]]:
    """The stored verdicts of ``families`` ("all", one family name, or a list of names) made by ``runs``, ordered by
    run, family and claim. A family with no verdicts of those runs is an error that lists the families that have
    some, and a run that stored nothing one that lists the runs that did."""
    if isinstance(runs, str) or not runs or not all(isinstance(r, str) and r for r in runs):
        raise ValueError(f"runs must be a list of run names, e.g. ['default'], got {runs!r}.")
    folders = sorted(p for p in verdicts_dir().glob("*/*") if p.is_dir() and any(p.glob("*.json")))
    made = {run: sorted(f.parent.name for f in folders if f.name == run) for run in runs}
    empty = [run for run in runs if not made[run]]
    if empty:
        known = sorted({f.name for f in folders})
        raise ArtifactError(f"No verdicts are stored for run(s) {empty} in {verdicts_dir()} (runs with verdicts: "
                            f"{known or 'none'}). Run that profile's chapters first (make book, or python -m "
                            "bookkit.runner --profile params/<profile>.yaml).")
    stored = sorted({family for found in made.values() for family in found})
    if families == "all":
        wanted = stored
    else:
        wanted = [families] if isinstance(families, str) else list(families)
        if not wanted or not all(isinstance(name, str) for name in wanted):
            raise ValueError(f"families must be 'all', a family name or a list of names, got {families!r}.")
        missing = [name for name in wanted if name not in stored]
        if missing:
            raise ValueError(f"No verdicts of run(s) {list(runs)} are stored for {missing} in {verdicts_dir()} "
                             f"(families with verdicts: {stored}). Check the name, or run that family's chapters "
                             "first (python -m bookkit.runner --profile params/<profile>.yaml).")
    return [read_json(p, "Delete it and re-run the chapter that writes this verdict.")
            for run in runs for family in wanted for p in sorted((verdicts_dir() / family / run).glob("*.json"))]


def stated(verdicts: Sequence[dict[str, Any]], claim: str, key: str = "statement") -> str:
    """The sentences that the stored verdicts of ``claim`` state under ``key``, one per family, each after its
    family's name when there are several; "" when none is stored."""
    said = [(v["family"], v[key]) for v in verdicts if v["claim"] == claim and v.get(key)]
    return " ".join(text if len(said) == 1 else f"{family}: {text}" for family, text in said)
