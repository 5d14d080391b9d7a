"""Dress rehearsal of the paper's profile (issue 19): every chapter of ``params/llama2-7b.yaml`` runs end to end,
offline, on a stand-in (``benchmarks/standin.py``) under the exact hub ids of ``lib/families.yaml``, with the paper's
data read through ``$REFUSAL_BOOK_PAPER_DATA``. What changes: ``device`` (the CPU for the GPU), and, to keep it
within three minutes, the sample sizes and token budgets that only repeat the same code (``standin.SMALLER``); the data
path, the layer rule, the variants and every chapter are the profile's. The numbers are meaningless and not
compared."""

from __future__ import annotations

import json
import shutil

import nbformat
import pytest
from safetensors.torch import load_file, save_file

from benchmarks import standin
from bookkit import chapters, runner
from lib import data, models
from lib.artifacts import REPO_ROOT


@pytest.fixture(scope="module")
def paper_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    standin.write_hub_models(root / "hub")
    return root, standin.write_paper_data(root / "paper-data")


def test_the_paper_data_listing_is_checked_like_a_download(paper_world, monkeypatch, tmp_path):
    _, listing = paper_world
    monkeypatch.setenv(data.PAPER_DATA_ENV, str(listing))
    protocol = data.load_paper_protocol()
    assert len(protocol["pairs"]) == 100 and len(protocol["test"]) == 420
    tampered = tmp_path / "sources.json"
    sources = {name: {**entry, "path": str(listing.parent / entry["path"])}  # absolute paths, read from elsewhere
               for name, entry in json.loads(listing.read_text()).items()}
    sources["alpaca"]["sha256"] = "0" * 64
    tampered.write_text(json.dumps(sources))
    monkeypatch.setenv(data.PAPER_DATA_ENV, str(tampered))
    with pytest.raises(data.DataIntegrityError, match="alpaca_data.json has SHA-256 .*expected 0000"):
        data.load_paper_protocol()
    tampered.write_text(json.dumps({"advbench": sources["advbench"]}))
    with pytest.raises(data.DataIntegrityError, match="no {path, sha256} entry for 'alpaca'"):
        data.load_paper_protocol()
    monkeypatch.setenv(data.PAPER_DATA_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(data.DataUnavailableError, match="missing.json, which does not exist"):
        data.load_paper_protocol()


@pytest.fixture(scope="module")
def rehearsed(paper_world, tmp_path_factory):
    """The whole paper profile, run once on the stand-in: (world root, profile path, artifacts folder, plan, the
    book's notebooks before the run)."""
    root, listing = paper_world
    here = tmp_path_factory.mktemp("rehearsed")
    environment = {"HF_HUB_CACHE": root / "hub", "HF_HUB_OFFLINE": "1", data.PAPER_DATA_ENV: listing,
                   "REFUSAL_BOOK_ARTIFACTS": here / "artifacts", "REFUSAL_BOOK_CACHE": here / "cache"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, str(value))
        patch.delenv("REFUSAL_BOOK_PROFILE", raising=False)
        before = {nb: nb.read_bytes() for nb in chapters.read_toc_notebooks(REPO_ROOT)}
        path = standin.paper_profile(here)
        plan = runner.run_profile(path)
        yield root, path, here / "artifacts", plan, before, patch


def test_every_chapter_of_the_paper_profile_runs_on_the_stand_in(rehearsed):
    _, _, artifacts_root, plan, before, _ = rehearsed
    assert {nb.stem for nb, _ in plan} == {nb.stem for nb in before} - {"01_organisms", "08_judge_audit"}
    assert all(nb.read_bytes() == text for nb, text in before.items())  # the book itself untouched
    written = artifacts_root / "runs" / "llama2-7b" / "book"
    assert sorted(p.stem for p in written.glob("*.ipynb")) == sorted(nb.stem for nb, _ in plan)
    conclusions = nbformat.read(written / "09_conclusions.ipynb", as_version=4)
    first = next(c for c in conclusions.cells if c.cell_type == "code" and "read_verdicts" in c.source)
    glued = {o["metadata"]["scrapbook"]["name"]: o["data"]["application/papermill.record/text/markdown"]
             for o in first.outputs}
    assert glued["read"] == "run llama2-7b, for llama2-7b"
    assert sorted(p.stem for p in (artifacts_root / "verdicts" / "llama2-7b" / "llama2-7b").glob("*.json")) \
        == ["ablation_modes", "beyond", "claim1", "claim2", "claim3", "layer_band", "subspace_modes"]


def test_the_paper_profile_without_its_transfer_entry_is_refused_before_anything_runs(tmp_path):
    path = standin.paper_profile(tmp_path, changes=lambda profile: profile["chapters"].pop("book/06_transfer"))
    with pytest.raises(runner.ProfileError, match=r"book/06_transfer would run with a bad parameter.*ssft-control"):
        runner.run_profile(path, dry_run=True)


def test_an_exploratory_run_leaves_the_profiles_verdicts_alone(rehearsed, tmp_path):
    """papermill with one changed parameter stores its verdicts as a run of its own; the profile's are untouched."""
    import papermill

    _, _, artifacts_root, plan, _, _ = rehearsed
    verdicts = artifacts_root / "verdicts" / "llama2-7b"
    before = {p: p.read_bytes() for p in (verdicts / "llama2-7b").glob("*.json")}
    params = {**dict((nb.stem, p) for nb, p in plan)["06_transfer"], "n_test": 4}
    papermill.execute_notebook(str(REPO_ROOT / "book" / "06_transfer.ipynb"), str(tmp_path / "out.ipynb"),
                               parameters=params, kernel_name=runner.KERNEL_NAME, progress_bar=False,
                               cwd=str(REPO_ROOT / "book"))
    assert {p: p.read_bytes() for p in (verdicts / "llama2-7b").glob("*.json")} == before
    adhoc = [p.name for p in verdicts.iterdir() if p.name.startswith("adhoc-")]
    assert len(adhoc) == 1 and (verdicts / adhoc[0] / "claim3.json").is_file()
    first = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells
    assert any(f"results are stored as run '{adhoc[0]}'" in o.get("text", "") for c in first if c.cell_type == "code"
               for o in c.get("outputs", []))


def test_chapters_refuse_directions_made_from_other_weights_before_writing(rehearsed):
    """After chapter 04, the LAT adapter changes (a new snapshot in the cache): chapters 05 and 06 stop at their first
    cell, before computing or writing anything, and say to re-run chapter 04."""
    root, path, artifacts_root, _, _, _ = rehearsed
    repo = root / "hub" / f"models--{models.family_spec('llama2-7b')['variants']['lat']['adapters'][0]['hub'].replace('/', '--')}"
    old = (repo / "refs" / "main").read_text()
    new = "f" * 40
    shutil.copytree(repo / "snapshots" / old, repo / "snapshots" / new)
    weights = repo / "snapshots" / new / "adapter_model.safetensors"
    save_file({name: tensor + 0.01 for name, tensor in load_file(weights).items()}, weights)
    (repo / "refs" / "main").write_text(new)
    written = artifacts_root / "runs" / "llama2-7b" / "book"
    results = [p for p in artifacts_root.rglob("*") if p.is_file() and p.parent.name != "logs"]  # logs: every run
    state = {p: p.stat().st_mtime_ns for p in results}
    try:
        for chapter in ("05_anatomy", "06_transfer"):
            with pytest.raises(runner.ChapterError, match=r"llama2-7b/lat were computed from other weights.*"
                                                          r"re-run book/04_directions"):
                runner.run_profile(path, only=[chapter])
    finally:
        (repo / "refs" / "main").write_text(old)
    assert {p: p.stat().st_mtime_ns for p in artifacts_root.rglob("*") if p.is_file() and p.parent.name != "logs"} == state
    assert (written / "05_anatomy.ipynb").is_file()  # the earlier, sound run's notebook is still there


def test_the_paper_family_loads_from_the_stand_in_cache_and_nf4_is_refused_on_cpu(paper_world, monkeypatch):
    from lib import models

    root, _ = paper_world
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root / "hub"))  # read when it was imported
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    lm = models.load("llama2-7b", "lat", device="cpu")
    assert lm.info.n_layers == 16 and lm.info.fingerprint == models.fingerprint("llama2-7b", "lat", "cpu")
    models.register_families({"llama2-7b-nf4": dict(models.family_spec("llama2-7b"), quantization="nf4")})
    with pytest.raises(ValueError, match="nf4.*CUDA"):
        models.load("llama2-7b-nf4", "ssft", device="cpu")
