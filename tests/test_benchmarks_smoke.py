"""benchmarks/: `make bench` and the GPU script's Python part run end to end on tiny models (seconds), and the
methods they time produce the same greedy tokens; the lanes benchmark on the offline model (its units are separate
processes, which cannot see the tiny family)."""

import importlib.util
import json
import sys

import pytest

from lib.artifacts import REPO_ROOT

if importlib.util.find_spec("benchmarks") is None:  # pytest run from outside the repo root
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import gpu_bench, hook_variants, profile_timing, run  # noqa: E402


def rows_by_method(rows):
    return {row["method"]: row for row in rows}


def test_make_bench_path_on_the_tiny_family(tiny_family, tmp_path):
    results = run.main(["--family", "tiny-llama", "--peer", "none", "--prompts", "3", "--new-tokens", "4",
                        "--repeats", "1", "--capture-prompts", "3", "--capture-repeats", "1",
                        "--score-prompts", "3", "--score-batch", "2", "--transfer-conditions", "2", "--transfer-prompts", "3", "--transfer-tokens", "3",
                        "--transfer-batch", "2", "--out", str(tmp_path)])
    generation = rows_by_method(results["generation"]["rows"])
    assert {row["same tokens as lib hooks"] for name, row in generation.items() if "plain" not in name} == {1.0}
    assert results["generation"]["ablation_changes_tokens"]
    capture = rows_by_method(results["capture"]["rows"])
    assert capture["HF output_hidden_states=True"]["max |diff| vs lib"] < 1e-5
    scoring = rows_by_method(results["scoring"]["rows"])
    assert max(row["max |diff| of log-probs"] for row in scoring.values()) < 1e-5
    assert results["transfer"]["complete"] and results["transfer"]["targets"] == ["lora"]
    levers = rows_by_method(results["levers"]["rows"])
    bfloat16 = levers.pop(run.GENERATE_BF16)  # runs on a float32 CPU model; changes the numbers, so not compared
    assert bfloat16["runs"] == 1 and bfloat16["median s"] > 0
    assert {row["same completions"] for row in levers.values()} == {"3/3"}
    assert {row["same judge labels"] for row in levers.values()} == {"3/3"}
    assert json.loads(next(tmp_path.glob("bench-*.json")).read_text())["family"] == "tiny-llama"
    assert "## Targets" in next(tmp_path.glob("bench-*.md")).read_text()


def test_gpu_script_smoke_path(tmp_path):
    results = gpu_bench.main(["--smoke", "--out", str(tmp_path)])
    batch = rows_by_method(results["paper_batch"]["rows"])
    assert {row["same tokens as lib hooks"] for name, row in batch.items() if "plain" not in name} == {1.0}
    transfer = results["transfer"]
    assert transfer["conditions_run"] == transfer["conditions"] and transfer["projected_total_s"] > 0


def test_profile_timing_stops_at_its_budget_and_leaves_no_kernel_behind(tmp_path, monkeypatch):
    """The whole-profile timing on the tiny stand-in with a budget that runs out in the first chapter: that chapter
    is stopped (the runner and its kernel killed), the rest are reported as not reached, and the report is written.
    The stand-in's build is stretched to leave the first chapter 3 s of the budget, less than a runner needs to start
    and run it on any host (a fixed budget let a fast host finish the chapter in time)."""
    import time

    import psutil

    budget, left_for_chapter = 25.0, 3.0
    build_world, start = profile_timing.build_world, time.perf_counter()

    def build_then_wait(*args, **kwargs):
        environment = build_world(*args, **kwargs)
        time.sleep(max(0.0, budget - left_for_chapter - (time.perf_counter() - start)))
        return environment

    monkeypatch.setattr(profile_timing, "build_world", build_then_wait)

    def kernels():  # the timing's own (its artifacts folder is under a "profile-timing-" temporary folder)
        found = set()
        for process in psutil.process_iter(["cmdline"]):
            try:
                if "ipykernel_launcher" in " ".join(process.info["cmdline"] or []) and \
                        "profile-timing-" in process.environ().get("REFUSAL_BOOK_ARTIFACTS", ""):
                    found.add(process.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    before = kernels()
    results = profile_timing.main(["--smoke", "--budget-s", str(budget), "--out", str(tmp_path)])
    statuses = [row["status"] for row in results["chapters"]]
    assert statuses[0] == profile_timing.STOPPED and set(statuses[1:]) == {profile_timing.NOT_REACHED}
    assert results["chapters"][0]["chapter"] == "02_activations" and len(statuses) == 7
    assert kernels() <= before
    assert "| 02_activations | stopped at the budget |" in next(tmp_path.glob("profile-*.md")).read_text()


def test_hook_variants_compute_the_same_projection():
    """Every hook body that benchmarks/hook_variants.py times, and lib's own path, ablate the same way (float32: same
    greedy tokens)."""
    rows = hook_variants.main(["--smoke", "--repeats", "1", "--new-tokens", "4", "--no-compile"])
    bodies = {name: row for name, row in rows.items() if "plain" not in name and "noop" not in name}
    assert len(bodies) == 5 and {row["same tokens as lib"] for row in bodies.values()} == {1.0}
    assert rows["noop hooks (dispatch only)"]["same tokens as lib"] < 1.0  # the bodies do ablate


@pytest.mark.slow
def test_lanes_benchmark_runs_both_arrangements_and_compares_their_numbers(capsys):
    from benchmarks import lanes

    result = lanes.main(["--rounds", "1", "--prompts", "2", "--tokens", "2"])
    assert result["rows"][0]["one lane s"] > 0 and result["rows"][0]["two lanes s"] > 0
    assert result["same numbers in every unit"] is True
    assert "same completions and scores in every unit: True" in capsys.readouterr().out
