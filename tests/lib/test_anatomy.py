"""lib.anatomy: massive-coordinate statistics, direction offsets and similarities, the coordinate swap, the
push-matched control, ablation that leaves the first token alone, and generation-free condition scores."""

import pandas as pd
import pytest
import torch

from lib import ablation, anatomy, capture, scores


def synthetic_stats(n_layers=2, d=8, massive=3):
    """Site statistics with one massive coordinate: 1000 at the first token, 50 +- 2 elsewhere; others 0 +- 1."""
    mean = torch.zeros(n_layers, 3, d)
    mean_square = torch.ones(n_layers, 3, d)
    first = torch.zeros(n_layers, 3, d)
    mean[:, 0, massive], mean_square[:, 0, massive], first[:, 0, massive] = 50.0, 50.0 ** 2 + 4.0, 1000.0
    return {"mean": mean, "mean_square": mean_square, "first": first}


def test_massive_coordinates_and_norms():
    stats = synthetic_stats()
    table = anatomy.massive_coordinates(stats, layer=1, top=2)
    assert table.index[0] == 3
    row = table.loc[3]
    assert (row["first token"], row["mean (other tokens)"]) == (1000.0, 50.0)
    assert row["std (other tokens)"] == pytest.approx(2.0) and row["mean / median std"] == pytest.approx(50.0)
    norms = anatomy.norms_by_layer(stats)
    assert norms["largest coordinate"].tolist() == [3, 3]
    assert norms.loc[0, "first token norm"] == pytest.approx(1000.0)
    assert norms.loc[0, "other tokens RMS norm"] == pytest.approx((2504.0 + 7) ** 0.5)


def test_direction_offsets_and_similarities_see_the_massive_coordinate():
    stats = synthetic_stats()
    a = torch.tensor([1.0, 0, 0, 0.0, 0, 0, 0, 0])
    b = torch.tensor([1.0, 0, 0, 0.1, 0, 0, 0, 0])  # cosine 0.995 with a, but 0.1 on the massive coordinate
    offsets = anatomy.direction_offsets({"a": a, "b": b}, stats, 1, [3])
    assert offsets.loc["a", "mean projection m"] == 0
    assert offsets.loc["b", "mean projection m"] == pytest.approx(50 * 0.1 / (1.01 ** 0.5))
    assert offsets.loc["b", "m from these coordinates"] == pytest.approx(offsets.loc["b", "mean projection m"])
    acts = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    acts[:, 3] = 50 + 2 * acts[:, 3]
    table = anatomy.similarities({"a": a, "b": b}, stats, 1, acts, reference="a")
    assert table.loc["a", "cosine"] == pytest.approx(1.0) and table.loc["b", "cosine"] > 0.99
    assert table.loc["b", "cosine, std-scaled"] < table.loc["b", "cosine"]
    assert table.loc["b", "mean projection gap"] == pytest.approx(offsets.loc["b", "mean projection m"])


def test_swap_and_matched_control():
    a, b = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    swapped = anatomy.swap_coordinate(a, b, 2)
    assert swapped.norm() == pytest.approx(1.0) and swapped[2] > 0.5
    mean = torch.tensor([10.0, -3.0, 50.0, 1.0])
    r = torch.tensor([0.2, 0.1, 0.05, 0.3])
    control = anatomy.matched_control(r, mean, seed=1)
    unit = r / r.norm()
    assert control.norm() == pytest.approx(1.0, abs=1e-6)
    assert float(control @ unit) == pytest.approx(0.0, abs=1e-6)
    assert float(control @ mean) == pytest.approx(float(unit @ mean), abs=1e-4)
    assert not torch.allclose(control, anatomy.matched_control(r, mean, seed=2))
    with pytest.raises(ValueError, match="zero or not finite"):
        anatomy.swap_coordinate(torch.zeros(3), b, 0)


def test_ablation_except_first_token(tiny, prompts):
    direction = torch.randn(64, generator=torch.Generator().manual_seed(4))
    unit = direction / direction.norm()
    clean = capture.collect(tiny, prompts, sites=("resid_post",), positions=[0, -1])["resid_post"]
    with anatomy.ablated_except_first(tiny, direction):
        acts = capture.collect(tiny, prompts, sites=("resid_post",), positions=[0, -1])["resid_post"]
    torch.testing.assert_close(acts[:, :, 0], clean[:, :, 0], atol=1e-5, rtol=1e-5)  # the first token untouched
    assert (acts[:, :, 1] @ unit).abs().max() < 1e-4  # everything else ablated
    assert (clean[:, :, 1] @ unit).abs().max() > 1e-2


def test_condition_scores(tiny, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path))
    direction = torch.randn(64, generator=torch.Generator().manual_seed(5))
    means = capture.site_statistics(tiny, prompts[2:], batch_size=2)["mean"]
    conditions = {"none": None, "zero": lambda lm: ablation.ablated(lm, direction),
                  "mean": lambda lm: ablation.ablated(lm, direction, mode="mean", means=means)}
    table = anatomy.condition_scores(tiny, conditions, prompts[:2], prompts[2:], batch_size=2, n_boot=50)
    assert table.loc["none", "harmless KL"] == pytest.approx(0.0, abs=1e-9)
    assert table.loc["none", "refusal score"] == pytest.approx(float(scores.refusal_score(tiny, prompts[:2]).mean()),
                                                               abs=1e-5)
    assert table.loc["zero", "refusal score"] != table.loc["mean", "refusal score"]
    assert (table["low"] <= table["refusal score"] + 1e-9).all() and (table["n"] == 2).all()
    push = anatomy.mean_push(direction, {"mean": means})
    assert push.shape == (tiny.info.n_layers, 3)
    torch.testing.assert_close(push.double(), means.double() @ unit_of(direction), atol=1e-5, rtol=1e-5)


def test_dissection_conditions_name_and_apply_each_experiment(tiny, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path))
    generator = torch.Generator().manual_seed(6)
    units = {name: unit_of(torch.randn(64, generator=generator)).float() for name in ("t", "s")}
    means = capture.site_statistics(tiny, prompts[2:], batch_size=2)["mean"]
    conditions = anatomy.dissection_conditions(units, "t", means, means[1, 0], coordinate=3, seed=1)
    per_source = ["zero", "mean", "zero, first token spared", "matched control"]
    assert list(conditions) == ["none", *[f"{s}: {c}" for s in units for c in per_source],
                                "t with s's coordinate", "s with t's coordinate"]
    table = anatomy.condition_scores(tiny, conditions, prompts[:2], None, batch_size=2, n_boot=20)
    expected = {"t: zero": lambda lm: ablation.ablated(lm, units["t"]),
                "t: mean": lambda lm: ablation.ablated(lm, units["t"], mode="mean", means=means),
                "s with t's coordinate": lambda lm: ablation.ablated(
                    lm, anatomy.swap_coordinate(units["s"], units["t"], 3)),
                "t: matched control": lambda lm: ablation.ablated(
                    lm, anatomy.matched_control(units["t"], means[1, 0], 1))}
    for name, condition in expected.items():
        with condition(tiny):
            score = float(scores.refusal_score(tiny, prompts[:2]).mean())
        assert table.loc[name, "refusal score"] == pytest.approx(score, abs=1e-5), name


def unit_of(direction):
    return (direction / direction.norm()).double()


def test_offset_summary_and_its_sentences():
    import pandas as pd

    score = {"none": 5.0, "ssft: zero": -1.0, "ssft: mean": -7.0, "ssft: zero, first token spared": -1.5,
             "ssft: matched control": 5.5, "at: zero": -7.0, "at: mean": -6.0, "at: zero, first token spared": -7.0,
             "at: matched control": 4.0, "ssft with at's coordinate": -6.4, "at with ssft's coordinate": -1.0}
    scores = pd.DataFrame({"refusal score": score})
    summary = anatomy.offset_summary(scores, "ssft", ["ssft", "at"])
    assert summary.loc["at", "drop, zero"] == 12.0 and summary.loc["ssft", "drop, mean"] == 12.0
    assert summary.loc["at", "swap moves (share of gap)"] == pytest.approx(0.9)  # (-6.4 + 1) / (-7 + 1)
    assert summary.loc["at", "control / source (zero)"] == pytest.approx(1 / 12)
    text = anatomy.describe(summary, "ssft", 507).splitlines()
    assert text[0] == ("ssft's own direction lowers its mean refusal score by 6.0 under zero ablation and by 12.0 "
                       "under mean ablation at every write site.")
    assert "giving ssft's direction this direction's value on coordinate 507 alone moves 90.0% of the" in text[1]
    assert "changes the score by -1.0, against -12.0" in text[1]


def test_the_mean_ablation_definitions_and_the_writes_that_separate_them(tiny, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path))
    direction = unit_of(torch.randn(64, generator=torch.Generator().manual_seed(9))).float()
    means = capture.site_statistics(tiny, prompts[2:], batch_size=2)["mean"]
    rest = capture.site_statistics(tiny, prompts[2:], batch_size=2, positions="rest")["mean"]
    conditions = anatomy.definition_conditions({"s": direction}, means, rest)
    assert list(conditions) == [f"s: mean, {d}" for d in anatomy.MEAN_DEFINITIONS] + [
        f"s: mean, {anatomy.OTHER_POSITIONS}"]
    table = anatomy.condition_scores(tiny, {"none": None, **conditions}, prompts[:2], None, batch_size=2, n_boot=20)
    expected = {"every write site": lambda lm: ablation.ablated(lm, direction, mode="mean", means=means),
                "block inputs": lambda lm: ablation.ablated(lm, direction, mode="mean", means=means,
                                                             sites=ablation.BLOCK_INPUTS),
                "block inputs + MLP outputs": lambda lm: ablation.ablated(
                    lm, direction, mode="mean", means=means, sites=("resid_pre", "mlp_out")),
                anatomy.OTHER_POSITIONS: lambda lm: ablation.ablated(lm, direction, mode="mean", means=rest)}
    for name, condition in expected.items():
        with condition(tiny):
            score = float(scores.refusal_score(tiny, prompts[:2]).mean())
        assert table.loc[f"s: mean, {name}", "refusal score"] == pytest.approx(score, abs=1e-5), name
    with pytest.raises(ValueError, match="Unknown mean-ablation definition 'somewhere'"):
        with anatomy.mean_ablated_at(tiny, direction, means, "somewhere"):
            pass


def test_definition_summary_shares_of_the_gap():
    drops = {"every write site": 10.0, "block inputs": 2.0, "block inputs + attention outputs": 4.0,
             "block inputs + MLP outputs": 10.0, "block inputs + last block's writes": 2.0}
    scores_frame = pd.DataFrame({"refusal score": {"none": 5.0, **{f"s: mean, {d}": 5.0 - v for d, v in drops.items()}}})
    summary = anatomy.definition_summary(scores_frame, ["s"])
    assert summary.loc["s", "drop, block inputs"] == 2.0
    assert summary.loc["s", "closes of the gap: MLP outputs"] == 1.0
    assert summary.loc["s", "closes of the gap: attention outputs"] == 0.25
    assert summary.loc["s", "closes of the gap: last block's writes"] == 0.0
    with_positions = scores_frame.copy()
    with_positions.loc[f"s: mean, {anatomy.OTHER_POSITIONS}", "refusal score"] = 4.0
    assert anatomy.definition_summary(with_positions, ["s"]).loc["s", f"drop, {anatomy.OTHER_POSITIONS}"] == 1.0
    assert anatomy.describe_definitions(anatomy.definition_summary(with_positions, ["s"]), "t").endswith(
        "With the means taken over every token but the first instead of at the last prompt token (every write "
        "site): s 1.0.")
    assert anatomy.describe_definitions(summary, "t") == (
        "Mean ablation at every write site lowers t's mean refusal score by s 10.0; at the block inputs only by s "
        "2.0. Share of that gap closed by also resetting each kind of write: s: attention outputs 25%, MLP outputs "
        "100%, last block's writes 0%.")
