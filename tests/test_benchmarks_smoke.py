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
    assert run.SCORE_ROW_BY_ROW in scoring and run.GENERATE_ROW_BY_ROW in results["levers"]["times"]  # lib before
    assert results["transfer"]["complete"] and results["transfer"]["targets"] == ["lora"]
    levers = rows_by_method(results["levers"]["rows"])
    bfloat16 = levers.pop(run.GENERATE_BF16)  # runs on a float32 CPU model; changes the numbers, so not compared
    assert bfloat16["runs"] == 1 and bfloat16["median s"] > 0
    assert {row["same completions"] for row in levers.values()} == {"3/3"}
    assert {row["same judge labels"] for row in levers.values()} == {"3/3"}
    products = results["products"]["rows"]  # each linear shape at a decode step's rows and at a prefill's
    assert len(products) >= 4 and sum("prefill" in row["product"] for row in products) == len(products) / 2
    assert all(row["packed GFLOP/s"] > 0 for row in products) and max(row["max |diff|"] for row in products) < 1e-3
    forward = results["forward"]["rows"]  # a layer sweep, capture and PGD with and without packed weights
    assert len(forward) == 3 and all(row["packed median s"] > 0 and row["MKL median s"] > 0 for row in forward)
    assert all(row["max |diff|"] < 1e-3 for row in forward)  # the same results up to the order of the sums
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


# Units that stand in for the model's work in the lanes benchmark: one that always computes the same numbers, one
# whose numbers differ from run to run (as a thread count that changed the products would make them).
SAME_UNIT = ('import json, time; time.sleep(0.2); '
             'print(json.dumps({{"seconds": 0.2, "digest": "{variant}-{prompts}-{tokens}"}}))')
DIFFERENT_UNIT = 'import json, os, time; time.sleep(0.2); print(json.dumps({{"seconds": 0.2, "digest": str(os.getpid())}}))'


@pytest.mark.parametrize("unit, same", [(SAME_UNIT, True), (DIFFERENT_UNIT, False)], ids=["same", "different"])
def test_lanes_benchmark_runs_both_arrangements_and_compares_their_numbers(capsys, unit, same):
    from benchmarks import lanes

    result = lanes.main(["--rounds", "2", "--prompts", "2", "--tokens", "2"], unit=unit)
    assert [row["round"] for row in result["rows"]] == [1, 2]
    assert all(row["one lane s"] > 0 and row["two lanes s"] > 0 for row in result["rows"])
    assert result["same numbers in every unit"] is same
    assert f"same completions and scores in every unit: {same}" in capsys.readouterr().out


@pytest.mark.slow
def test_the_lanes_benchmarks_unit_of_work_runs_on_the_model():
    from benchmarks import lanes

    measured = lanes.finish(lanes.start_unit(lanes.UNIT.format(variant="ssft", prompts=2, tokens=2), 1))
    assert measured["seconds"] > 0 and len(measured["digest"]) == 16


def write_generation(root, folder, name, result):
    path = root / "artifacts" / folder / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": name[-16:], "result": result}))


def test_same_generations_pairs_conditions_across_cache_keys_and_reports_a_changed_completion(tmp_path, capsys):
    from benchmarks import same_generations

    first, second = tmp_path / "a", tmp_path / "b"
    for root, keys in ((first, ("0" * 16, "1" * 16)), (second, ("2" * 16, "3" * 16))):  # lib's code differs
        write_generation(root, "evaluations/tiny/sft", f"none-{keys[0]}", {"completions": ["no", "sure"],
                                                                           "labels": ["refusal", "valid"]})
        write_generation(root, "evaluations/tiny/sft", f"none-{keys[1]}", {"completions": ["yes"], "labels": ["valid"]})
        write_generation(root, "attacks/tiny/sft", f"layer0-{keys[0]}", ["ok"])
    assert same_generations.main([str(first), str(second)]) == 0
    assert "3 generated artifacts (4 completions) identical" in capsys.readouterr().out
    write_generation(second, "attacks/tiny/sft", "layer0-" + "3" * 16, ["ok", "a token changed"])
    write_generation(first, "attacks/tiny/sft", "layer0-" + "1" * 16, ["ok", "a token"])
    assert same_generations.main([str(first), str(second)]) == 1
    out = capsys.readouterr().out
    assert out.count("no identical twin") == 2 and "attacks/tiny/sft/layer0" in out
