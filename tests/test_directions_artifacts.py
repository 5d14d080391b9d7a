"""lib.directions and lib.artifacts (atomic, checksummed, keyed tensor files)."""

import json

import pytest
import torch

from lib import artifacts, directions
from lib.artifacts import ArtifactError


def test_difference_in_means_and_unit():
    harmful = torch.tensor([[[2.0, 0.0]], [[4.0, 0.0]]])
    harmless = torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]]])
    diff = directions.mean_difference(harmful, harmless)
    torch.testing.assert_close(diff, torch.tensor([[3.0, -1.0]]))
    r = directions.refusal_directions(harmful, harmless)
    torch.testing.assert_close(r.norm(dim=-1), torch.ones(1))
    torch.testing.assert_close(directions.paired_differences(harmful, harmless)[0, 0], torch.tensor([2.0, -1.0]))
    assert directions.cosine_similarity(torch.tensor([1.0, 0]), torch.tensor([2.0, 0])) == pytest.approx(1.0)


def test_direction_errors():
    with pytest.raises(ValueError, match="zero"):
        directions.unit(torch.zeros(3))
    with pytest.raises(ValueError, match="matching"):
        directions.mean_difference(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="equally many"):
        directions.paired_differences(torch.zeros(2, 3), torch.zeros(3, 3))


def test_save_load_roundtrip(tmp_path):
    path = tmp_path / "acts.safetensors"
    artifacts.save_tensors(path, {"x": torch.arange(6.0).reshape(2, 3)}, {"key": "k1", "model": "tiny"})
    tensors, meta = artifacts.load_tensors(path, key="k1")
    assert torch.equal(tensors["x"], torch.arange(6.0).reshape(2, 3))
    assert meta["model"] == "tiny" and meta["tensors"] == ["x"]
    with pytest.raises(ArtifactError, match="different inputs"):
        artifacts.load_tensors(path, key="k2")


def test_corrupted_tensor_file_is_refused(tmp_path):
    path = tmp_path / "acts.safetensors"
    artifacts.save_tensors(path, {"x": torch.ones(4)}, {"key": "k"})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        artifacts.load_tensors(path)
    assert not artifacts.is_fresh(path, "k")


def test_interrupted_write_leaves_nothing_trusted(tmp_path):
    path = tmp_path / "acts.safetensors"
    artifacts.save_tensors(path, {"x": torch.ones(2)}, {"key": "old"})

    class Interrupted(Exception):
        pass

    def compute():
        raise Interrupted

    with pytest.raises(Interrupted):
        artifacts.cached_tensors(path, "new", {}, compute)
    # the old, complete artifact is still intact and still only trusted under its own key
    assert artifacts.is_fresh(path, "old") and not artifacts.is_fresh(path, "new")
    assert not list(tmp_path.glob(".*.tmp"))


def test_sidecar_missing_means_incomplete(tmp_path, monkeypatch):
    path = tmp_path / "acts.safetensors"

    def failing_write_json(target, obj):
        raise KeyboardInterrupt  # killed between the tensor file and its sidecar

    monkeypatch.setattr(artifacts, "write_json", failing_write_json)
    with pytest.raises(KeyboardInterrupt):
        artifacts.save_tensors(path, {"x": torch.ones(2)}, {"key": "k"})
    monkeypatch.undo()
    assert path.exists() and not artifacts.sidecar_path(path).exists()
    assert not artifacts.is_fresh(path, "k")
    with pytest.raises(ArtifactError, match="never completed"):
        artifacts.load_tensors(path)
    calls = []
    tensors, _ = artifacts.cached_tensors(path, "k", {}, lambda: calls.append(1) or {"x": torch.zeros(2)})
    assert calls == [1] and torch.equal(tensors["x"], torch.zeros(2))


def test_cache_key_changes_with_parameters():
    assert artifacts.cache_key(a=1, b="x") == artifacts.cache_key(b="x", a=1)
    assert artifacts.cache_key(a=1) != artifacts.cache_key(a=2)


def test_missing_artifact_message(tmp_path):
    with pytest.raises(ArtifactError, match="make book"):
        artifacts.load_tensors(tmp_path / "nope.safetensors")


def test_write_json_is_atomic(tmp_path):
    target = tmp_path / "m.json"
    artifacts.write_json(target, {"b": 1, "a": 2})
    assert json.loads(target.read_text()) == {"a": 2, "b": 1}


def test_separation_is_zero_where_means_coincide():
    same = torch.ones(5, 1, 3)
    harmful = torch.cat([same, torch.randn(5, 1, 3, generator=torch.Generator().manual_seed(0)) + 5], dim=1)
    harmless = torch.cat([same, torch.randn(5, 1, 3, generator=torch.Generator().manual_seed(1))], dim=1)
    sep = directions.separation(harmful, harmless)
    assert sep[0] == 0 and sep[1] > 3
