"""Paths, hashing, and atomically written safetensors artifacts with a JSON metadata sidecar.

Every artifact is a pair ``NAME.safetensors`` + ``NAME.json``. The sidecar is written last and records the SHA-256
of the tensor file and the cache key of everything that determined it, so a half-written or stale file is never
trusted: ``load_tensors`` verifies both and ``cached_tensors`` recomputes on any mismatch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import lib

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
ARTIFACTS_ENV = "REFUSAL_BOOK_ARTIFACTS"
CACHE_ENV = "REFUSAL_BOOK_CACHE"


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, corrupted or stale."""


def artifacts_dir() -> Path:
    """Where chapters write their outputs: ``$REFUSAL_BOOK_ARTIFACTS`` or ``<repo>/artifacts``."""
    return Path(os.environ.get(ARTIFACTS_ENV, REPO_ROOT / "artifacts"))


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


def code_fingerprint() -> str:
    """A hash of lib's source (every .py and .yaml file): any change to the code that computes an artifact
    invalidates it, without relying on anyone remembering to bump the version."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(lib.__file__).parent.iterdir() if p.suffix in {".py", ".yaml"}):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(**parts: Any) -> str:
    """A stable hash of everything that determines an artifact, including lib's version and source code."""
    payload = json.dumps({"lib_version": lib.__version__, "lib_code": code_fingerprint(), **parts},
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
    return json.loads(sidecar.read_text(encoding="utf-8"))


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
        raise ArtifactError(f"{path} was computed with different inputs (key {meta.get('key')} != {key}). "
                            "Re-run the chapter that writes it.")
    return load_file(str(path)), meta


def is_fresh(path: str | Path, key: str) -> bool:
    """True when ``path`` is complete, uncorrupted and was computed under ``key``."""
    try:
        load_tensors(path, key)
    except ArtifactError:
        return False
    return True


def cached_tensors(path: str | Path, key: str, metadata: dict[str, Any],
                   compute: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return the artifact at ``path`` if it was computed under ``key``; otherwise compute and save it."""
    if is_fresh(path, key):
        return load_tensors(path, key)
    save_tensors(path, compute(), {**metadata, "key": key})
    return load_tensors(path, key)


def cached_json(path: str | Path, key: str, compute: Callable[[], Any]) -> Any:
    """Return the JSON result stored at ``path`` under ``key``, or compute, store (atomically) and return it."""
    path = Path(path)
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            stored = None
        if isinstance(stored, dict) and stored.get("key") == key:
            return stored["result"]
    result = compute()
    write_json(path, {"key": key, "lib_version": lib.__version__, "result": result})
    return result


def verdicts_dir() -> Path:
    return artifacts_dir() / "verdicts"


def write_verdict(family: str, claim: str, verdict: dict[str, Any]) -> Path:
    """Store a chapter's computed verdict on one of the paper's claims, for the conclusions chapter."""
    path = verdicts_dir() / family / f"{claim}.json"
    write_json(path, {"family": family, "claim": claim, **verdict})
    return path


def read_verdicts() -> list[dict[str, Any]]:
    """Every stored verdict, ordered by family and claim."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(verdicts_dir().glob("*/*.json"))]
