"""lib.directions and lib.artifacts (atomic, checksummed, keyed tensor files)."""

import json

import pytest
import torch

from lib import artifacts, directions, linalg
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
        linalg.unit(torch.zeros(3))
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
    assert artifacts.load_tensors(path, "old")[0]["x"].tolist() == [1.0, 1.0]
    with pytest.raises(artifacts.StaleArtifactError):
        artifacts.load_tensors(path, "new")
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
    with pytest.raises(ArtifactError, match="never completed"):
        artifacts.load_tensors(path)
    calls = []
    with pytest.warns(UserWarning, match="half-written; recomputing it"):
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


def test_corrupt_sidecar_names_the_file_and_the_cache_recomputes(tmp_path):
    path = tmp_path / "acts.safetensors"
    artifacts.save_tensors(path, {"x": torch.ones(2)}, {"key": "k1"})
    artifacts.sidecar_path(path).write_text('{"key": "k1", "sha')
    with pytest.raises(ArtifactError, match=r"acts.json is not valid JSON.*re-run the chapter"):
        artifacts.load_tensors(path, "k1")
    with pytest.warns(UserWarning, match="damaged or half-written; recomputing it"):
        tensors, _ = artifacts.cached_tensors(path, "k1", {}, lambda: {"x": torch.zeros(2)})
    assert torch.equal(tensors["x"], torch.zeros(2))  # recomputed, as the module promises, and said so


def test_corrupt_verdict_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.ARTIFACTS_ENV, str(tmp_path))
    artifacts.write_verdict("default", "fam", "claim1", {"verdict": "supported"})
    (artifacts.verdicts_dir() / "fam" / "default" / "claim1.json").write_text("{")
    with pytest.raises(ArtifactError, match=r"claim1.json is not valid JSON.*re-run the chapter"):
        artifacts.read_verdicts()


def test_read_jsonl_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(ArtifactError, match=r"rows.jsonl, line 3: not valid JSON.*Restore it"):
        artifacts.read_jsonl(path, "Restore it.")
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert artifacts.read_jsonl(path, "") == [{"a": 1}, {"a": 2}]


def test_read_verdicts_selects_families_by_exact_name(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.ARTIFACTS_ENV, str(tmp_path))
    with pytest.raises(ArtifactError, match=r"No verdicts are stored for run\(s\) \['default'\].*runs with verdicts: none"):
        artifacts.read_verdicts()
    for family in ("smollm2-135m", "llama2-7b"):
        artifacts.write_verdict("default", family, "claim1", {"verdict": "supported"})
    assert [v["family"] for v in artifacts.read_verdicts()] == ["llama2-7b", "smollm2-135m"]
    assert [v["family"] for v in artifacts.read_verdicts("smollm2-135m")] == ["smollm2-135m"]
    with pytest.raises(ValueError, match=r"No verdicts of run\(s\) \['default'\] are stored for \['xsmollm2-135mx'\].*llama2-7b"):
        artifacts.read_verdicts("xsmollm2-135mx")  # not a substring match
    with pytest.raises(ValueError, match="a family name or a list"):
        artifacts.read_verdicts([3])


def test_verdicts_of_other_runs_never_reach_the_books(tmp_path, monkeypatch):
    """An exploratory run's verdict is stored beside the book's, never over it; the conclusions name the runs."""
    monkeypatch.setenv(artifacts.ARTIFACTS_ENV, str(tmp_path))
    artifacts.write_verdict("default", "fam", "claim1", {"verdict": "supported"})
    artifacts.write_verdict("adhoc-1234abcd", "fam", "claim1", {"verdict": "not supported"})
    assert [v["verdict"] for v in artifacts.read_verdicts()] == ["supported"]
    assert [v["verdict"] for v in artifacts.read_verdicts(runs=["adhoc-1234abcd"])] == ["not supported"]
    assert [v["run"] for v in artifacts.read_verdicts(runs=["default", "adhoc-1234abcd"])] == ["default", "adhoc-1234abcd"]
    with pytest.raises(ArtifactError, match=r"run\(s\) \['llama2-7b'\].*runs with verdicts: \['adhoc-1234abcd', 'default'\]"):
        artifacts.read_verdicts(runs=["default", "llama2-7b"])
    with pytest.raises(ValueError, match="list of run names"):
        artifacts.read_verdicts(runs="default")


def test_artifact_paths_come_from_one_registry(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.ARTIFACTS_ENV, str(tmp_path))
    assert artifacts.artifact_path("evaluations", "fam", "ssft", "x.json") == tmp_path / "evaluations/fam/ssft/x.json"
    with pytest.raises(ValueError, match="Unknown artifact kind 'evaluation'.*'evaluations'"):
        artifacts.artifact_path("evaluation", "fam")
    readme = (artifacts.REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert all(f"`{kind}`" in readme for kind in artifacts.ARTIFACT_KINDS)


def test_a_corrupt_cache_is_recomputed_with_a_warning_and_a_stale_one_quietly(tmp_path, recwarn):
    import warnings

    path = tmp_path / "acts.safetensors"
    artifacts.cached_tensors(path, "k1", {}, lambda: {"x": torch.ones(2)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors, _ = artifacts.cached_tensors(path, "k2", {}, lambda: {"x": torch.zeros(2)})  # stale: no warning
    assert torch.equal(tensors["x"], torch.zeros(2))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"acts.safetensors is damaged or half-written; recomputing it"):
        tensors, _ = artifacts.cached_tensors(path, "k2", {}, lambda: {"x": torch.full((2,), 3.0)})
    assert torch.equal(tensors["x"], torch.full((2,), 3.0))
    json_path = tmp_path / "result.json"
    json_path.write_text("{")
    with pytest.warns(UserWarning, match="not valid JSON.*recomputing it"):
        assert artifacts.cached_json(json_path, "k", lambda: [1]) == [1]


def test_settling_states_when_each_direction_settled():
    import pandas as pd

    from lib import directions

    def frame(steps):
        return pd.DataFrame({"n": range(2, 2 + len(steps)), "step distance": steps,
                             "cosine to final": [0.9 + 0.01 * i for i in range(len(steps))]})

    table, statement = directions.settling({"a": frame([0.5, 0.2, 0.005, 0.004]), "b": frame([0.5, 0.2, 0.1, 0.02])},
                                           at_n=4)
    assert table.iloc[:, 1].tolist()[0] == 4 and pd.isna(table.iloc[1, 1])
    assert statement == ("By the paper's criterion (every later step below 0.01), the directions settled from n = "
                         "a 4; b not within the 5 pairs; the 4-pair direction's cosine with the all-pairs one is "
                         "0.920 to 0.920.")
    _, never = directions.settling({"b": frame([0.5, 0.2, 0.1, 0.02])}, at_n=100)
    assert never == "By the paper's criterion (every later step below 0.01), no variant's direction settled within the 5 pairs."
