"""The analysis stages: spectra tables and bootstrap intervals, direction diagnostics (convergence, top-PC removal,
probes, artifact round trip), cached interventions, the transfer matrix and
the claim-3 contrasts. Uses the tiny random Llama with the paper's template (the llama2-7b code path)."""

from dataclasses import replace

import pandas as pd
import pytest
import torch

from lib import (ablation, artifacts, claims, directions, judges, layer_selection, linalg, models, scores, spectra, stats,
                 transfer, viz)
from lib.config import Config
from lib.layer_selection import LayerRule

SMALL = Config("tiny-llama", device="cpu", batch_size=2)  # generation in batches of 2
SCORED = Config("tiny-llama", device="cpu", score_batch_size=2, n_boot=50)  # scores in batches of 2, 50 resamples


@pytest.fixture
def artifact_root(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.ARTIFACTS_ENV, str(tmp_path))
    return tmp_path


def gaussian(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# --- spectra -----------------------------------------------------------------------------------------------------

def test_rank_one_differences_have_all_energy_in_one_component():
    rows = torch.linspace(1, 2, 20).unsqueeze(1) * gaussian(1, 16, 0)
    table = spectra.spectrum_frame({"x": rows}).set_index("measure")
    assert table.loc["uncentred (paper)", "top-1"] == pytest.approx(1.0, abs=1e-6)
    assert table.loc["centred (PCA)", "top-1"] == pytest.approx(1.0, abs=1e-6)  # still rank one after centring
    noisy = table.loc["uncentred (paper)"]
    assert noisy["n"] == 20


def test_two_dimensional_differences_beat_one_dimensional_ones_beyond_the_interval():
    basis = torch.linalg.qr(gaussian(16, 2, 1))[0].T  # two orthonormal axes
    n = 80
    one = 3 * basis[0] + 0.3 * gaussian(n, 16, 2)
    two = 3 * basis[0] + torch.randn(n, 1, generator=torch.Generator().manual_seed(3)) * 2 * basis[1] \
        + 0.3 * gaussian(n, 16, 4)
    single, pairwise = spectra.share_intervals({"one": one, "two": two}, ks=(2,), n_boot=200, seed=0)
    assert ((single["low"] <= single["share"]) & (single["share"] <= single["high"])).all()
    row = pairwise[(pairwise["variant"] == "two") & (pairwise["versus"] == "one")].iloc[0]
    assert row["difference"] > 0 and row["low"] > 0
    assert stats.verdict(row["low"], row["high"], "higher", "lower", "open") == "higher"


def test_bootstrap_shares_from_the_gram_matrix_equal_a_direct_svd_of_each_resample():
    matrix = gaussian(30, 12, 7) + 1.5
    for centred in (False, True):
        fast = spectra.bootstrap_shares(matrix, (1, 2, 10), n_boot=5, seed=3, centred=centred)
        for b, rows in enumerate(stats.bootstrap_indices(30, 5, 3)):
            direct = spectra.top_k_shares(spectra.energy_fractions(matrix[rows], centred), (1, 2, 10))
            assert fast[b].tolist() == pytest.approx(list(direct.values()), abs=1e-5)


def test_basic_interval_covers_the_population_top_2_share_where_the_percentile_interval_does_not():
    """Rank-two signal plus isotropic noise (like the book's D): the population top-2 share is known exactly.
    Resampling pairs with replacement repeats rows and inflates resampled shares, so the percentile interval
    under-covers; the basic interval should be close to 95%."""
    d, n, reps, sigma = 64, 100, 80, 0.35
    population = torch.full((d,), sigma ** 2, dtype=torch.float64)
    population[0] += 10.0  # E[a^2] for a ~ N(3, 1)
    population[1] += 1.0  # E[b^2] for b ~ N(0, 1)
    target = float(population.sort(descending=True).values[:2].sum() / population.sum())
    second_target = float(population.sort(descending=True).values[1] / population.sum())
    covered = {"percentile": 0, "basic": 0, "second, basic": 0}
    for rep in range(reps):
        generator = torch.Generator().manual_seed(100 + rep)
        x = sigma * torch.randn(n, d, generator=generator, dtype=torch.float64)
        x[:, 0] += 3 + torch.randn(n, generator=generator, dtype=torch.float64)
        x[:, 1] += torch.randn(n, generator=generator, dtype=torch.float64)
        share = spectra.top_k_shares(spectra.energy_fractions(x), (2,))[2]
        boots = spectra.bootstrap_shares(x, (2,), n_boot=150, seed=rep)[:, 0]
        low, high = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        covered["percentile"] += low <= target <= high
        low, high = stats.basic_interval(share, boots)
        covered["basic"] += low <= target <= high
        second = float(spectra.energy_fractions(x).double()[1])
        low, high = stats.basic_interval(second, spectra.bootstrap_fractions(x, 150, rep)[:, 1])
        covered["second, basic"] += low <= second_target <= high
    print(covered)
    assert covered["basic"] / reps >= 0.85 and covered["basic"] > covered["percentile"]
    assert covered["second, basic"] / reps >= 0.85  # the second component's own share, claim 2's measure


def test_share_intervals_report_the_resampling_bias():
    matrix = gaussian(40, 64, 8)  # isotropic noise: a resample's repeated rows concentrate its spectrum
    single, _ = spectra.share_intervals({"noise": matrix}, ks=(10,), n_boot=300, seed=0)
    boots = spectra.bootstrap_shares(matrix, (10,), n_boot=300, seed=0)[:, 0]
    assert single.loc[0, "bias"] == pytest.approx(float(boots.mean()) - single.loc[0, "share"])
    assert single.loc[0, "bias"] > 0.05
    assert (single.loc[0, "low"], single.loc[0, "high"]) == pytest.approx(
        stats.basic_interval(single.loc[0, "share"], boots))


def test_layer_shares_skip_identical_layers_and_svd_directions_point_along_the_mean():
    tensor = torch.stack([torch.zeros(10, 8), gaussian(10, 8, 5) + 4], dim=1)
    frame = spectra.layer_share_frame({"v": tensor}, k=2)
    assert frame["layer"].tolist() == [1] and "low" not in frame
    with_intervals = spectra.layer_share_frame({"v": tensor}, k=2, n_boot=50)
    boots = spectra.bootstrap_shares(tensor[:, 1], (2,), n_boot=50)[:, 0]
    expected = stats.basic_interval(with_intervals.loc[0, "share"], boots)
    assert (with_intervals.loc[0, "low"], with_intervals.loc[0, "high"]) == pytest.approx(expected)
    axes = spectra.svd_directions(tensor[:, 1], 2)
    assert axes.shape == (2, 8)
    assert float(axes[0] @ tensor[:, 1].mean(0)) > 0
    assert torch.allclose(axes @ axes.T, torch.eye(2), atol=1e-5)


def test_scree_frame_cumulates():
    frame = spectra.scree_frame({"v": gaussian(12, 6, 6)}, components=4)
    for _, group in frame.groupby("measure"):
        assert group["cumulative"].is_monotonic_increasing
        assert group["cumulative"].iloc[-1] <= 1 + 1e-9


def test_scree_intervals_come_from_the_same_resamples_as_the_share_intervals():
    matrix = gaussian(30, 12, 9) + 1.0
    frame = spectra.scree_frame({"v": matrix}, components=3, n_boot=60, seed=4)
    single, _ = spectra.share_intervals({"v": matrix}, ks=(1, 2, 3), n_boot=60, seed=4)
    uncentred = frame[frame["measure"] == "uncentred (paper)"].set_index("component")
    for k in (1, 2, 3):
        row = single[single["k"] == f"top-{k}"].iloc[0]
        assert (uncentred.loc[k, "cumulative_low"], uncentred.loc[k, "cumulative_high"]) == pytest.approx(
            (row["low"], row["high"]))
    per_component = spectra.bootstrap_fractions(matrix, 60, 4)[:, 1]
    assert (uncentred.loc[2, "low"], uncentred.loc[2, "high"]) == pytest.approx(
        stats.basic_interval(uncentred.loc[2, "share"], per_component))
    assert (frame["low"] < frame["high"]).all() and (frame["cumulative_low"] < frame["cumulative_high"]).all()
    assert {"low", "cumulative_low"}.isdisjoint(spectra.scree_frame({"v": matrix}, components=3).columns)


# --- directions --------------------------------------------------------------------------------------------------

def test_cosine_matrix_and_layer_directions():
    a, b = gaussian(1, 8, 7)[0], gaussian(1, 8, 8)[0]
    matrix = directions.cosine_matrix({"a": a, "b": b, "-a": -a})
    assert matrix.loc["a", "a"] == pytest.approx(1) and matrix.loc["a", "-a"] == pytest.approx(-1)
    assert matrix.loc["a", "b"] == pytest.approx(matrix.loc["b", "a"])
    units = directions.layer_directions(torch.stack([torch.zeros(8), 3 * a]))
    assert torch.equal(units[0], torch.zeros(8)) and units[1].norm() == pytest.approx(1, abs=1e-6)
    with pytest.raises(ValueError, match="zero"):
        ablation.check_directions(units[0], 8)


def test_convergence_settles_with_more_pairs():
    shift = torch.zeros(8)
    shift[0] = 5
    harmful, harmless = gaussian(200, 8, 9) + shift, gaussian(200, 8, 10)
    frame = directions.convergence(harmful, harmless)
    assert frame["n"].iloc[0] == 2 and frame["cosine to final"].iloc[-1] == pytest.approx(1)
    assert frame["step distance"].iloc[-1] < frame["step distance"].iloc[0]
    n = directions.settled_at(frame, 0.01)
    assert n is not None and (frame[frame["n"] >= n]["step distance"] < 0.01).all()
    assert directions.settled_at(frame, 1e-12) is None


def test_top_pc_removal_drops_a_dominant_shared_axis():
    axis = torch.zeros(8)
    axis[1] = 1
    refusal = torch.zeros(8)
    refusal[0] = 1
    spread = 40 * torch.randn(100, 1, generator=torch.Generator().manual_seed(11)) * axis
    harmful = spread[:50] + 2 * refusal + 0.1 * gaussian(50, 8, 12) + 3 * axis  # also differs along the big axis
    harmless = spread[50:] + 0.1 * gaussian(50, 8, 13)
    plain = linalg.unit(directions.mean_difference(harmful, harmless))
    removed = directions.top_pc_removed_direction(harmful, harmless)
    assert abs(float(removed @ axis)) < abs(float(plain @ axis))
    assert float(removed @ refusal) > 0.9


def test_probe_accuracy_separable_and_random():
    shift = torch.zeros(8)
    shift[0] = 6
    easy = directions.probe_accuracy(gaussian(40, 8, 14) + shift, gaussian(40, 8, 15), "logistic")
    assert easy["accuracy"] > 0.95 and easy["low"] <= easy["accuracy"] <= easy["high"] and easy["n"] == 80
    hard = directions.probe_accuracy(gaussian(40, 8, 16), gaussian(40, 8, 17), "forest")
    assert hard["accuracy"] < 0.8
    with pytest.raises(ValueError, match="Unknown probe"):
        directions.probe_accuracy(gaussian(4, 8, 0), gaussian(4, 8, 1), "svm")


def test_probe_frame_is_one_probe_per_variant_and_layer():
    shift = torch.zeros(8)
    shift[0] = 6
    harmless = torch.stack([gaussian(30, 8, 20), gaussian(30, 8, 21)], 1)  # [n, layers, d]: layer 1 separable
    acts = {"a": {"harmful": torch.stack([gaussian(30, 8, 22), gaussian(30, 8, 23) + shift], 1), "harmless": harmless}}
    frame = directions.probe_frame(acts, {"a": [0, 1]}, seed=3)
    assert frame[["variant", "layer"]].values.tolist() == [["a", 0], ["a", 1]]
    assert frame["accuracy"][1] > 0.95 > frame["accuracy"][0]
    assert frame.iloc[1].drop(["variant", "layer"]).to_dict() == directions.probe_accuracy(
        acts["a"]["harmful"][:, 1], harmless[:, 1], "logistic", 5, 3)


def test_directions_artifact_round_trip_and_staleness(artifact_root, tiny):
    unit = directions.layer_directions(gaussian(4, 64, 18))
    directions.save_directions("tiny-llama", {"base": {"unit": unit, "mean_difference": 2 * unit}},
                               {"chosen_layers": {"base": 2}, "fingerprints": {"base": tiny.info.fingerprint}})
    stored, meta = directions.load_directions("tiny-llama")
    assert torch.equal(stored["base"]["unit"], unit) and meta["chosen_layers"] == {"base": 2}
    directions.check_matches(meta, tiny.info)
    with pytest.raises(artifacts.ArtifactError, match="re-run"):
        directions.check_matches({**meta, "fingerprints": {"base": "0" * 16}}, tiny.info)
    with pytest.raises(artifacts.ArtifactError, match="does not exist"):
        directions.load_directions("no-such-family")


def test_load_current_checks_and_attack_layers_follow_the_rule(artifact_root, tiny, tiny_family):
    unit = directions.layer_directions(gaussian(4, 64, 19))
    meta = {"chosen_layers": {"base": 2, "lora": 1}, "paper_layer": 3, "reasons": {"base": "b", "lora": "l"},
            "fingerprints": {"base": tiny.info.fingerprint, "lora": "0" * 16}}
    directions.save_directions("tiny-llama", {v: {"unit": unit.clone(), "mean_difference": 2 * unit}
                                              for v in ("base", "lora")}, meta)
    stored, loaded = directions.load_current("tiny-llama", ["base"], device="cpu")
    assert torch.equal(stored["base"]["unit"], unit) and loaded["chosen_layers"] == meta["chosen_layers"]
    with pytest.raises(artifacts.ArtifactError, match="tiny-llama/lora"):
        directions.load_current("tiny-llama", ["base", "lora"], device="cpu")
    assert directions.attack_layers(meta, ["lora", "base"]) == {"lora": 1, "base": 2}
    assert directions.attack_layers(meta, ["lora", "base"], "paper") == {"lora": 3, "base": 3}
    with pytest.raises(ValueError, match="layer_rule = 'best'"):
        directions.attack_layers(meta, ["base"], "best")
    assert directions.layer_table(meta, {"base": 2}).loc["base"].tolist() == [2, "b"]
    assert directions.layer_table(meta, {"base": 3}, "paper").loc["base", "why"] == "the paper's relative layer"


# --- judges: scores, bootstrap, contrasts ------------------------------------------------------------------------

def test_next_token_log_probs_agree_with_refusal_score(tiny, prompts):
    log_probs = scores.next_token_log_probs(tiny, prompts, batch_size=3)
    assert log_probs.shape[0] == len(prompts)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(len(prompts), dtype=torch.float64))
    assert torch.allclose(scores.refusal_score_from(tiny, log_probs), scores.refusal_score(tiny, prompts, 2),
                          atol=1e-5)
    assert torch.allclose(scores.kl_divergence(log_probs, log_probs), torch.zeros(len(prompts)))


def test_bootstrap_difference_and_contrast():
    same = ["refusal", "valid"] * 20
    result = judges.bootstrap_rate_difference(same, same)
    assert result["difference"] == 0 and result["low"] <= 0 <= result["high"]
    more = judges.bootstrap_rate_difference(["refusal"] * 40, ["valid"] * 40)
    assert more["difference"] == 100 and more["low"] == 100
    with pytest.raises(ValueError, match="same prompts"):
        judges.bootstrap_combination({"a": ["refusal"], "b": ["refusal", "valid"]}, {"a": 1.0, "b": -1.0})
    with pytest.raises(ValueError, match="not a mix"):
        judges.bootstrap_combination({"a": ["refusal"], "b": [1.0]}, {"a": 1.0, "b": -1.0})
    contrast = judges.bootstrap_combination({"a": ["refusal"] * 30 + ["valid"] * 10, "b": ["valid"] * 40},
                                            {"a": 0.5, "b": -0.5}, n_boot=200)
    assert contrast["difference"] == pytest.approx(37.5) and contrast["low"] > 0 and contrast["cells"] == 2


def test_intervention_keys_and_application(tiny, prompts):
    d1, d2 = gaussian(1, 64, 19)[0], gaussian(1, 64, 20)[0]
    assert ablation.Intervention("ablate", d1).key() == ablation.Intervention("ablate", d1.clone()).key()
    assert ablation.Intervention("ablate", d1).key() != ablation.Intervention("ablate", d2).key()
    assert ablation.Intervention("ablate", d1).key() != ablation.Intervention("add", d1, layer=1).key()
    with pytest.raises(ValueError, match="layer"):
        ablation.Intervention("add", d1)
    with pytest.raises(ValueError, match="Unknown intervention"):
        ablation.Intervention("scale", d1)
    assert ablation.orthogonalizable(tiny)
    with ablation.Intervention("ablate", d1).applied(tiny):
        baked = scores.next_token_log_probs(tiny, prompts)
    with ablation.ablated(tiny, d1):
        hooked = scores.next_token_log_probs(tiny, prompts)
    assert (baked - hooked).abs().max() < 1e-4


def test_transfer_matrix_caches_every_condition(artifact_root, tiny_family, prompts, monkeypatch):
    from lib import generation

    calls = []
    real = generation.generate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", counting)
    sources = {"a": gaussian(1, 64, 22)[0], "b": gaussian(1, 64, 23)[0]}
    first = transfer.transfer_matrix(SMALL, sources, ["base", "lora"], prompts[:2], 3)
    assert set(first) == {(s, t) for s in ("none", "a", "b") for t in ("base", "lora")}
    assert all(len(r["labels"]) == 2 for r in first.values())
    assert len(calls) == 6
    again = transfer.transfer_matrix(SMALL, sources, ["base", "lora"], prompts[:2], 3)
    assert again == first and len(calls) == 6  # every condition came from its cached artifact
    transfer.transfer_matrix(SMALL, sources, ["base"], prompts[:2], 4)
    assert len(calls) == 9  # a changed setting recomputes


def test_verdicts_round_trip(artifact_root):
    artifacts.write_verdict("default", "fam", "claim2", {"verdict": "supported"})
    assert artifacts.read_verdicts() == [{"family": "fam", "claim": "claim2", "run": "default", "verdict": "supported"}]


# --- charts ------------------------------------------------------------------------------------------------------

def test_new_charts_have_stable_specs():
    frame = pd.DataFrame({"source": ["a", "a", "b", "b"], "target": ["x", "y", "x", "y"], "rate": [1.0, 2, 3, 4]})
    heat = viz.heatmap_chart(frame, "target", "source", "rate", "t", viz.PERCENT_COLOURS)
    again = viz.heatmap_chart(frame, "target", "source", "rate", "t", viz.PERCENT_COLOURS)
    assert viz.spec_id(heat.to_dict()) == viz.spec_id(again.to_dict())
    lines = pd.DataFrame({"layer": [1, 2, 1, 2], "share": [0.1, 0.2, 0.3, 0.4], "variant": ["a", "a", "b", "b"]})
    assert viz.lines_chart(lines, "layer", "share", "variant", "t", viz.Layout(log_y=True), rule=0.5).to_dict()
    with pytest.raises(ValueError, match="missing column"):
        viz.lines_chart(lines, "layer", "nope", "variant", "t")
    banded = viz.lines_chart(lines.assign(low=lines["share"] - 0.05, high=lines["share"] + 0.05, m="u"), "layer",
                             "share", "variant", "t", viz.Layout(facet="m"), band=("low", "high")).to_dict()
    marks = [layer["mark"]["type"] for layer in banded["spec"]["layer"]]
    assert marks == ["area", "line"] and banded["spec"]["layer"][0]["encoding"]["y2"]["field"] == "high"
    assert "column" in banded["facet"] and "resolve" not in banded  # the default: one row, one y scale
    units = lines.assign(m=["%", "%", "share", "share"])
    wrapped = viz.lines_chart(units, "layer", "share", "variant", "t", viz.Layout(facet="m", columns=1,
                                                                                 independent_y=True)).to_dict()
    assert wrapped["columns"] == 1 and wrapped["facet"]["sort"] == ["%", "share"]
    assert wrapped["resolve"] == {"scale": {"y": "independent"}}
    table = viz.interval_table(lines.assign(low=0.0, high=1.0), "share", ["variant"], "layer", digits=2)
    assert table.loc["b", 2] == "0.40 [0.00, 1.00]" and list(table.columns) == [1, 2]
    scree = spectra.scree_frame({"v": gaussian(10, 5, 24)}, 3)
    assert viz.scree_chart(scree, "t").to_dict()["title"] == "t"
    whiskers = viz.scree_chart(spectra.scree_frame({"v": gaussian(10, 5, 24)}, 3, n_boot=20), "t").to_dict()
    assert [layer["mark"]["type"] for layer in whiskers["spec"]["layer"]].count("rule") == 2


# --- held-out prompts, profiles ----------------------------------------------------------------------------------

def test_test_and_sweep_prompts(monkeypatch):
    from pathlib import Path

    from lib import data

    offline = data.test_prompts("offline", 5)
    assert offline["harmful"] == [p.harmful for p in data.split("test")[:5]] and len(offline["harmless"]) == 5
    sweep = data.sweep_prompts("offline", 4)
    assert not set(sweep["harmful"]) & set(data.test_prompts("offline")["harmful"])
    assert not set(sweep["harmful"]) & {p.harmful for p in data.split("pairs")}
    fixtures = Path(__file__).parent.parent / "fixtures"
    protocol = data.paper_protocol(fixtures / "advbench_small.csv", fixtures / "alpaca_small.json", n_pairs=5,
                                   expect_rows=20)
    monkeypatch.setattr(data, "load_paper_protocol", lambda **kwargs: protocol)
    paper = data.test_prompts("paper")
    assert paper["harmful"] == [p.text for p in protocol["test"]] and paper["harmless"] == protocol["test_harmless"]
    assert data.sweep_prompts("paper", 2)["harmless"] == protocol["train_harmless"][5:7]
    with pytest.raises(ValueError, match="outside"):
        data.test_prompts("offline", 10_000)
    with pytest.raises(ValueError, match="Unknown dataset"):
        data.sweep_prompts("nope")


def test_profiles_validate_against_the_chapters(tmp_path):
    from bookkit import chapters, runner
    from lib.artifacts import REPO_ROOT

    notebooks = chapters.read_toc_notebooks(REPO_ROOT)
    for name in ("default", "llama2-7b"):
        plan = chapters.plan_runs(runner.load_profile(REPO_ROOT / "params" / f"{name}.yaml"), notebooks, REPO_ROOT)
        assert plan
    llama = dict(chapters.plan_runs(runner.load_profile(REPO_ROOT / "params" / "llama2-7b.yaml"), notebooks, REPO_ROOT))
    assert not any(nb.stem == "01_organisms" for nb in llama)  # skipped: it trains the offline family
    transfer = next(params for nb, params in llama.items() if nb.stem == "06_transfer")
    assert transfer["family"] == "llama2-7b" and transfer["dataset"] == "paper" and transfer["layer_rule"] == "paper"
    bad = tmp_path / "bad.yaml"
    bad.write_text("skip: [book/nope]\n", encoding="utf-8")
    with pytest.raises(runner.ProfileError, match="book/nope"):
        chapters.plan_runs(runner.load_profile(bad), notebooks, REPO_ROOT)
    bad.write_text("skip: book/01_organisms\n", encoding="utf-8")
    with pytest.raises(runner.ProfileError, match="'skip' must be a list"):
        runner.load_profile(bad)


def test_score_matrix_on_the_paper_template(tiny_family, prompts):
    subspaces = {"one": gaussian(1, 64, 25)[0], "plane": gaussian(2, 64, 26)}
    frame = transfer.score_matrix(SCORED, subspaces, ["base"], prompts)
    assert frame["source"].tolist() == ["none", "one", "plane"] and (frame["n"] == len(prompts)).all()
    assert (frame["low"] <= frame["score"] + 1e-9).all() and (frame["score"] <= frame["high"] + 1e-9).all()
    lm = models.load("tiny-llama", "base", device="cpu")
    assert frame.loc[0, "score"] == pytest.approx(float(scores.refusal_score(lm, prompts).double().mean()), abs=1e-5)
    assert "[INST]" in lm.info.template.format(lm.tokenizer, "x")  # the paper's template


def test_subspace_gains_pair_the_same_prompts(tiny_family, prompts):
    plane = gaussian(2, 64, 27)
    subspaces = {"s, k=1": plane[:1], "s, k=2": plane}
    frame = transfer.score_matrix(SCORED, subspaces, ["base"], prompts)
    gains = transfer.subspace_gains(frame, ["s"], [1, 2], n_boot=200, seed=0)
    row = gains.iloc[0]
    per_source = frame.set_index("source")["score"]
    assert (row["from"], row["to"], row["n"]) == ("k=1", "k=2", len(prompts))
    assert row["change"] == pytest.approx(per_source["s, k=2"] - per_source["s, k=1"], abs=1e-9)
    assert row["low"] <= row["change"] <= row["high"]


def test_gain_modes_names_the_steps_whose_verdict_flips():
    import pandas as pd

    def gains(intervals):
        return pd.DataFrame([{"source": "lat", "target": t, "from": "k=2", "to": "k=3", "change": (lo + hi) / 2,
                              "low": lo, "high": hi, "n": 8} for t, (lo, hi) in zip(("a", "b"), intervals)])

    table, statement = transfer.gain_modes({"zero": gains([(5.0, 9.0), (-1.0, 1.0)]),
                                            "mean": gains([(-3.0, -1.0), (-1.0, 1.0)])})
    assert table.loc[("lat", "k=2", "k=3", "a")].tolist() == ["score falls less", "score falls more", False]
    assert table.loc[("lat", "k=2", "k=3", "b"), "same under both"]
    assert statement == ("1 of 2 subspace-growth verdicts change between zero and mean ablation: lat k=2 to k=3 "
                         "(score falls less in 1, no difference in 1 of 2 targets under zero ablation; "
                         "score falls more in 1, no difference in 1 under mean ablation).")
    same, sentence = transfer.gain_modes({"zero": gains([(1.0, 2.0)] * 2), "mean": gains([(1.0, 3.0)] * 2)})
    assert sentence == ("0 of 2 subspace-growth verdicts change between zero and mean ablation. The same under both "
                        "modes: lat k=2 to k=3 (score falls less in 2 of 2 targets).")
    with pytest.raises(ValueError, match="'zero' and 'mean'"):
        transfer.gain_modes({"zero": gains([(1.0, 2.0)] * 2)})
    with pytest.raises(ValueError, match="different sources"):
        transfer.gain_modes({"zero": gains([(1.0, 2.0)] * 2), "mean": gains([(1.0, 2.0)])})


def test_bootstrap_mean_difference_is_paired():
    a = [1.0, 2.0, 3.0, 4.0]
    shifted = judges.bootstrap_mean_difference([x + 0.5 for x in a], a, n_boot=100)
    assert shifted["difference"] == pytest.approx(0.5) and shifted["low"] == pytest.approx(0.5)  # no spread: paired
    with pytest.raises(ValueError, match="equally long"):
        judges.bootstrap_mean_difference([1.0], a)


def test_mean_mode_reaches_sweeps_matrices_and_transfer(artifact_root, tiny_family, prompts):
    """``mode="mean"`` flows through every ablation entry point, each target using its own site means."""
    lm = models.load("tiny-llama", "base", device="cpu")
    reference = prompts[2:]
    split = {"harmful": prompts[:2], "harmless": prompts[2:]}
    candidates = directions.layer_directions(gaussian(lm.info.n_layers, 64, 28))
    zero = layer_selection.layer_sweep(lm, candidates, split, [1, 2], batch_size=2)
    mean = layer_selection.layer_sweep(lm, candidates, split, [1, 2], batch_size=2, mode="mean",
                                       reference=reference)
    assert mean.loc[0].tolist() == zero.loc[0].tolist()  # the unablated row
    assert (mean["refusal score"][1:] - zero["refusal score"][1:]).abs().max() > 1e-3
    means = ablation.ablation_means(lm, "mean", reference, batch_size=2)
    with ablation.Intervention("ablate", candidates[1], mode="mean", means=means).applied(lm):
        direct = float(scores.refusal_score(lm, prompts[:2], 2).mean())
        direct_all = float(scores.refusal_score(lm, prompts, 2).double().mean())
    assert mean.loc[1, "refusal score"] == pytest.approx(direct, abs=1e-5)
    sweep, layer, _ = layer_selection.sweep_and_select(lm, candidates, split, LayerRule(1, max_kl=float("inf")),
                                                       batch_size=2, mode="mean", reference=reference)
    assert sweep.set_index("layer").loc[[1, 2], "refusal score"].tolist() == pytest.approx(
        mean.set_index("layer").loc[[1, 2], "refusal score"].tolist(), abs=1e-6)
    subspaces = {"one": candidates[1], "plane": gaussian(2, 64, 29)}
    by_mode = {m: transfer.score_matrix(replace(SCORED, n_boot=20), subspaces, ["base", "lora"], prompts, mode=m,
                                       reference=reference) for m in ("zero", "mean")}
    assert by_mode["mean"]["score"][0] == by_mode["zero"]["score"][0]
    assert by_mode["mean"].set_index(["source", "target"]).loc[("one", "base"), "score"] == pytest.approx(direct_all, 1e-5)
    runs = transfer.transfer_matrix(SMALL, {"one": candidates[1]}, ["base", "lora"], prompts[:2], 3, mode="mean",
                                    reference=reference)
    assert set(runs) == {(s, t) for s in ("none", "one") for t in ("base", "lora")}
    evaluations = sorted(p.name for p in (artifact_root / "evaluations" / "tiny-llama" / "lora").iterdir())
    assert any(name.startswith("ablate-mean-") for name in evaluations)
    with pytest.raises(ValueError, match="reference prompts"):
        transfer.score_matrix(Config("tiny-llama", device="cpu"), subspaces, ["base"], prompts, mode="mean")


@pytest.fixture
def tiny_three(tiny_family):
    """The tiny Llama as a family of three variants (the claim-3 contrasts need a focus and two others)."""
    adapter = {"path": str(tiny_family / "adapter")}
    models.register_families({"tiny-three": {
        "base": {"local": str(tiny_family / "base")}, "template": "\n[INST]{prompt}[/INST]\n",
        "add_special_tokens": True, "refusal_tokens": ["sorry", "i"],
        "variants": {"ssft": {"adapters": []}, "at": {"adapters": [adapter]}, "lat": {"adapters": [adapter, adapter]}}}})
    return "tiny-three"


def test_mode_matrix_scores_both_modes_and_a_matched_control(artifact_root, tiny_three, prompts):
    sources = {s: gaussian(1, 64, 40 + i)[0] for i, s in enumerate(("ssft", "at", "lat"))}
    frame = transfer.mode_matrix(replace(SCORED, family=tiny_three), sources, {s: 2 for s in sources},
                                 ["ssft", "at", "lat"], prompts[:2], prompts[2:], reference=prompts)
    assert len(frame) == 3 * (1 + 3 * 4) and set(frame["condition"]) == {"none", "zero", "mean", "mean-inputs",
                                                                          "control"}
    none = frame[frame["source"] == "none"]
    assert (none["KL"].abs() < 1e-9).all() and (frame["n"] == 2).all()
    cells = frame.set_index(["source", "target", "condition"])["score"]
    assert abs(cells[("at", "ssft", "zero")] - cells[("at", "ssft", "mean")]) > 1e-3
    assert abs(cells[("at", "ssft", "zero")] - cells[("at", "ssft", "control")]) > 1e-3
    assert abs(cells[("at", "ssft", "mean")] - cells[("at", "ssft", "mean-inputs")]) > 1e-3
    lm = models.load(tiny_three, "ssft", device="cpu")
    with ablation.Intervention("ablate", sources["at"]).applied(lm):
        direct = scores.refusal_score(lm, prompts[:2], 2).double().mean()
    assert cells[("at", "ssft", "zero")] == pytest.approx(float(direct), abs=1e-5)
    result = transfer.mode_contrasts(frame, "lat", ("ssft", "at"), n_boot=50)
    assert set(result["claim3"]["mode"]) == {"zero", "mean", "mean-inputs"} and len(result["claim3"]) == 36
    assert set(result["claim3"]["reading"]) == {transfer.SCORE, transfer.CHANGE}
    assert len(result["claim1"]) == 9 and len(result["controls"]) == 9
    table, sentence = transfer.surviving(result["claim3"], result["claim1"])
    assert len(table) == 4 and sentence


def synthetic_mode_frame(lat_self_drop: dict, control_shift: float, lat_start: float = 5.0):
    """A mode_matrix frame for lat/ssft/at on 40 prompts: unablated scores ~5 (lat's ~``lat_start``); every
    foreign direction lowers the score by 2, ssft's and at's own directions by 4, lat's by
    ``lat_self_drop[mode]`` (the block-input mean ablation as the write-site one); each control lies
    ``control_shift`` above its zero-ablation cell."""
    noise = torch.linspace(-0.5, 0.5, 40).tolist()
    rows = []
    for t in ("lat", "ssft", "at"):
        start = lat_start if t == "lat" else 5.0
        rows.append({"source": "none", "target": t, "condition": "none",
                     "per_prompt": tuple(start + x for x in noise)})
        for s in ("lat", "ssft", "at"):
            drops = {mode: (lat_self_drop[mode] if s == "lat" else 4.0) if s == t else 2.0 for mode in ("zero", "mean")}
            drops["mean-inputs"] = drops["mean"]
            for condition, drop in (*drops.items(), ("control", drops["zero"] - control_shift)):
                rows.append({"source": s, "target": t, "condition": condition,
                             "per_prompt": tuple(start - drop + x for x in noise)})
    return pd.DataFrame(rows)


def test_mode_contrasts_name_the_verdicts_that_flip():
    steady = transfer.mode_contrasts(synthetic_mode_frame({"zero": 8.0, "mean": 8.0}, 3.0), n_boot=200)
    table, sentence = transfer.surviving(steady["claim3"], steady["claim1"])
    assert table[transfer.SAME].all() and sentence.startswith("Every verdict is the same under zero ablation and "
                                                              "both definitions of mean ablation")
    assert table.loc["LAT vulnerable to its own direction", "zero ablation"] == "supported"
    assert (steady["claim1"]["verdict"] == "refusal drops").all()
    assert (steady["controls"]["verdict"] == "direction beats its control").all()
    flipping = transfer.mode_contrasts(synthetic_mode_frame({"zero": 8.0, "mean": -1.0}, 0.0), n_boot=200)
    table, sentence = transfer.surviving(flipping["claim3"], flipping["claim1"])
    vulnerable = table.loc["LAT vulnerable to its own direction"]
    assert (vulnerable["zero ablation"], vulnerable["mean ablation (write sites)"]) == ("supported", "contradicted")
    assert not table.loc["Claim 1: every model's own direction lowers its refusal", transfer.SAME]
    assert sentence.startswith(f"{(~table[transfer.SAME]).sum()} of 4 verdicts are not the same")
    assert ("LAT vulnerable to its own direction: supported under zero ablation, contradicted under mean ablation "
            "(write sites), contradicted under mean ablation (block inputs)") in sentence
    assert (flipping["controls"]["verdict"] == "no difference: the push alone").all()


def test_a_verdict_that_rests_on_a_higher_start_is_not_the_same_as_a_change():
    """LAT starts 3 points higher and loses exactly what the others lose: its refusal left under foreign directions
    is higher (the score reading supports "robust"), but nothing less was removed (the change reading does not)."""
    frame = synthetic_mode_frame({"zero": 8.0, "mean": 8.0}, 3.0, lat_start=8.0)
    result = transfer.mode_contrasts(frame, n_boot=200)
    by_versus = result["claim3"].set_index(["claim", "versus", "mode", "reading"])
    robust = by_versus.loc[("LAT robust to foreign directions", "target ssft")]
    assert (robust.loc[("zero", transfer.SCORE), "verdict"], robust.loc[("mean", transfer.SCORE), "verdict"]) == (
        "supported", "supported")
    assert robust.loc[("zero", transfer.CHANGE), "difference"] == pytest.approx(0.0, abs=1e-9)
    assert robust.loc[("zero", transfer.CHANGE), "verdict"] != "supported"
    table, sentence = transfer.surviving(result["claim3"], result["claim1"])
    assert not table.loc["LAT robust to foreign directions", transfer.SAME]
    assert "LAT robust to foreign directions: supported under zero ablation" in sentence


def test_score_matrix_without_the_baseline_scores_only_the_sources(tiny_family, prompts):
    subspaces = {"one": gaussian(1, 64, 25)[0]}
    full = transfer.score_matrix(SCORED, subspaces, ["base"], prompts)
    bare = transfer.score_matrix(SCORED, subspaces, ["base"], prompts, baseline=False)
    assert bare["source"].tolist() == ["one"]
    assert bare.iloc[0].drop("per_prompt").tolist() == full.iloc[1].drop("per_prompt").tolist()


def test_the_second_components_own_share_is_top2_minus_top1_from_the_same_resamples():
    matrix = torch.randn(30, 12, generator=torch.Generator().manual_seed(5))
    other = matrix + 0.3 * torch.randn(30, 12, generator=torch.Generator().manual_seed(6))
    single, pairwise = spectra.share_intervals({"a": matrix, "b": other}, (1, 2), n_boot=80, seed=2,
                                               components=(2,))
    shares = single.set_index(["variant", "k"])["share"]
    fractions = spectra.energy_fractions(matrix).double()
    assert shares[("a", "component 2")] == pytest.approx(float(fractions[1]), abs=1e-12)
    assert shares[("a", "component 2")] == pytest.approx(shares[("a", "top-2")] - shares[("a", "top-1")], abs=1e-12)
    boots = spectra.bootstrap_fractions(matrix, 80, 2) - spectra.bootstrap_fractions(other, 80, 2)
    row = pairwise.set_index(["variant", "versus", "k"]).loc[("a", "b", "component 2")]
    expected = stats.basic_interval(float(fractions[1] - spectra.energy_fractions(other).double()[1]), boots[:, 1])
    assert (row["low"], row["high"]) == pytest.approx(expected, abs=1e-12)


def test_control_damage_counts_the_cells_where_the_control_does_less_damage():
    cells = [("ssft", "a", 0.58, 0.40), ("ssft", "b", 0.26, 0.26), ("at", "a", 0.50, 0.20)]
    frame = pd.DataFrame([{"source": s, "target": t, "condition": c, "KL": kl} for s, t, zero, control in cells
                          for c, kl in (("zero", zero), ("control", control), ("mean", 9.0))])
    assert transfer.control_damage(frame) == ("the control's harmless KL is below its source's in 2 of 3 cells, "
                                              "at 40% to 100% of it (median 69%).")


def test_band_matrix_scores_each_layers_direction_in_each_target(artifact_root, tiny_three, prompts):
    units = {s: torch.stack([gaussian(1, 64, 60 + 4 * i + layer)[0] for layer in range(4)])
             for i, s in enumerate(("ssft", "at", "lat"))}
    units = {s: u / u.norm(dim=-1, keepdim=True) for s, u in units.items()}
    frame = transfer.band_matrix(replace(SCORED, family=tiny_three), units, [1, 2], ["ssft", "lat"], prompts[:2],
                                 reference=prompts)
    assert len(frame) == 2 * 2 * (1 + 3 * 2) and set(frame["condition"]) == {"none", "zero", "mean"}
    cells = frame.set_index(["layer", "source", "target", "condition"])["score"]
    assert cells[(1, "none", "lat", "none")] == cells[(2, "none", "lat", "none")]
    lm = models.load(tiny_three, "lat", device="cpu")
    with ablation.Intervention("ablate", units["at"][2]).applied(lm):
        direct = scores.refusal_score(lm, prompts[:2], 2).double().mean()
    assert cells[(2, "at", "lat", "zero")] == pytest.approx(float(direct), abs=1e-5)
    assert cells[(2, "at", "lat", "zero")] != pytest.approx(cells[(1, "at", "lat", "zero")], abs=1e-6)


def test_band_verdicts_show_a_verdict_that_holds_at_one_layer_only():
    """At layer 3 LAT's own direction removes more from LAT than from the others (vulnerable: supported); at layer 4
    as little as a foreign direction does (not supported). The band's table says so layer by layer, in both modes."""
    frames = [synthetic_mode_frame({"zero": drop, "mean": drop}, 3.0).assign(layer=layer)
              for layer, drop in ((3, 8.0), (4, 2.0))]
    band = transfer.band_verdicts(pd.concat(frames, ignore_index=True), n_boot=200)
    table = band["verdicts"].set_index(["claim", "layer"])
    vulnerable = table.loc["LAT vulnerable to its own direction"]
    assert vulnerable.loc[3, "zero ablation"] == "supported" and vulnerable.loc[4, "zero ablation"] != "supported"
    assert list(table.columns) == ["zero ablation", "mean ablation (write sites)"]
    assert table.loc[(claims.CLAIM1_MODES_ROW, 3), "zero ablation"] == "supported"
    assert set(band["claim3"]["layer"]) == {3, 4} and set(band["claim3"]["mode"]) == {"zero", "mean"}


def test_band_statement_names_the_verdicts_that_depend_on_the_layer():
    verdicts = pd.DataFrame([{"claim": "A", "layer": 9, "zero ablation": "supported", "mean": "supported"},
                             {"claim": "A", "layer": 10, "zero ablation": "supported", "mean": "not resolved"}])
    assert transfer.band_statement(verdicts) == (
        "Across layers 9 to 10: A: supported under zero ablation, supported at 1, not resolved at 1 of 2 layers "
        "under mean.")


def test_unanimous_needs_every_word_to_agree():
    from lib.claims import unanimous

    assert unanimous(["up", "up"], "up", "down") == "supported"
    assert unanimous(["down"], "up", "down") == "contradicted"
    assert unanimous(["up", "down"], "up", "down") == "not supported"
    assert unanimous(["up", "unclear"], "up", "down") == "not supported"
    assert unanimous([], "up", "down") == "not supported"
    assert unanimous(["down", "down"], "up", "down", ("yes", "no", "mixed")) == "no"
