"""benchmarks/: `make bench` and the GPU script's Python part run end to end on tiny models (seconds), the methods
they time produce the same greedy tokens, and the report's targets are the ratios measured side by side."""

import argparse
import importlib.util
import json
import subprocess
import sys

from lib.artifacts import REPO_ROOT

if importlib.util.find_spec("benchmarks") is None:  # pytest run from outside the repo root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import gpu_bench, run  # noqa: E402


def rows_by(rows, key="method"):
    return {row[key]: row for row in rows}


def test_make_bench_path_on_the_tiny_family(tiny_family, tmp_path):
    results = run.main(["--family", "tiny-llama", "--peer", "none", "--threads", "1", "--prompts", "3",
                        "--new-tokens", "4", "--repeats", "1", "--capture-prompts", "3", "--score-prompts", "3",
                        "--score-batch", "2", "--packed-prompts", "3", "--packed-batch", "2", "--out", str(tmp_path)])
    generation = rows_by(results["generation"]["rows"])
    assert set(generation) == {run.PLAIN, run.HOOKS, run.ORTHO, run.LOOP}
    assert {row["same tokens as lib hooks"] for name, row in generation.items() if name != run.PLAIN} == {1.0}
    assert results["generation"]["ablation_changes_tokens"]
    assert rows_by(results["capture"]["rows"])[run.HIDDEN]["max |diff| vs lib"] < 1e-5
    assert max(row["max |diff| of log-probs"] for row in results["scoring"]["rows"]) < 1e-5
    packed = rows_by(results["packed"]["rows"], "workload")  # the tiny family's trained variant is "lora"
    assert results["packed"]["target"] == "lora" and len(packed) == 4
    assert packed[run.GENERATION]["agreement"] == "3/3 completions identical"
    assert {row["setting"] for row in packed.values()} == {"1", "all"}
    assert all(row["packed median s"] > 0 and row["MKL median s"] > 0 for row in packed.values())
    for name in ("layer sweep (4 layers, 16 + 16 prompts)", "capture (32 prompts, every layer)"):
        assert float(packed[name]["agreement"].split()[-1]) < 1e-3  # the same up to the order of the sums
    targets = {row["target"] for row in run.target_rows(results)}
    assert "hooks vs the paper's recompute loop" in targets and "greedy generation: packed weights vs MKL" in targets
    assert "training" not in results  # the tiny family has no training recipe: the section says so and is skipped
    assert json.loads(next(tmp_path.glob("bench-*.json")).read_text())["family"] == "tiny-llama"
    assert "## Targets" in next(tmp_path.glob("bench-*.md")).read_text()


def test_training_steps_are_timed_packed_and_with_mkl(tiny_family, tmp_path, monkeypatch):
    from lib import training
    from tests.lib.test_training import EXAMPLES

    adversarial = {"steps": 4, "batch_size": 2, "learning_rate": 1e-2, "lora_r": 2, "lora_alpha": 2, "pgd_steps": 2}
    monkeypatch.setattr(training, "recipes", lambda: {"tiny-llama": {"adversarial": adversarial}})
    monkeypatch.setattr(training, "recipe_examples", lambda family: EXAMPLES)
    monkeypatch.setattr(run, "chosen_radius", lambda family, layer: 1.0)
    results = {}
    run.bench_training(argparse.Namespace(family="tiny-llama", device="cpu", dtype="auto", seed=0, repeats=1,
                                          train_steps=1), "cpu", results)
    assert results["training"]["start"] == "base"  # the tiny family has no SSFT variant
    rows = rows_by(results["training"]["rows"], "step")
    assert set(rows) == set(run.TRAINING_KINDS.values())
    assert all(row["packed s/step"] > 0 and row["MKL s/step"] > 0 for row in rows.values())
    assert rows[run.TRAINING_KINDS["control"]]["vs plain step (MKL)"] == 1.0
    assert rows[run.TRAINING_KINDS["lat"]]["vs plain step (MKL)"] > 0  # tiny-model timings are noise: no ordering
    assert "LAT training step: packed weights vs MKL" in {row["target"] for row in run.target_rows(results)}


def test_targets_are_within_round_ratios_against_their_goal():
    times = {run.PLAIN: [1.0, 2.0, 1.0], run.HOOKS: [2.0, 2.0, 1.25], run.ORTHO: [1.0, 2.0, 1.0]}
    rows = rows_by(run.target_rows({"generation": {"times": times}}), "target")
    assert set(rows) == {"hooks vs plain generate", "orthogonalised vs plain generate"}  # only what ran
    assert rows["hooks vs plain generate"] == {"target": "hooks vs plain generate", "measured": "0.80x",
                                               "goal": ">= 0.85x", "met": "NO"}  # median of 0.5, 1.0, 0.8
    assert rows["orthogonalised vs plain generate"]["met"] == "yes"


def test_gpu_script_smoke_path(tmp_path):
    results = gpu_bench.main(["--smoke", "--out", str(tmp_path)])
    batch = rows_by(results["paper_batch"]["rows"])
    assert {row["same tokens as lib hooks"] for name, row in batch.items() if name != gpu_bench.PLAIN} == {1.0}
    assert results["paper_batch"]["hooks_vs_loop"] > 0
    transfer = results["transfer"]
    assert transfer["conditions_run"] == transfer["conditions"] and transfer["projected_total_s"] > 0
    assert "## Transfer workload" in next(tmp_path.glob("gpu-*.md")).read_text()


def test_gpu_script_refuses_an_unknown_option():
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh"), "--whole-profile"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown option --whole-profile" in done.stderr
