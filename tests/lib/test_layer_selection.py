"""The layer sweep and Arditi et al.'s selection rule (lib.layer_selection), on the tiny random Llama."""

import pandas as pd
import pytest
import torch

from lib import directions, layer_selection, models
from lib.config import Config
from lib.layer_selection import LayerRule


def gaussian(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def split(prompts):
    return {"harmful": prompts[:2], "harmless": prompts[2:]}


def test_layer_sweep_and_selection(tiny, prompts):
    candidates = directions.layer_directions(gaussian(tiny.info.n_layers, 64, 21))
    sweep = layer_selection.layer_sweep(tiny, candidates, split(prompts), [1, 2], batch_size=2)
    assert sweep["layer"].tolist() == [-1, 1, 2]
    assert sweep.loc[0, "KL"] == 0 and (sweep["KL"] >= -1e-9).all()
    frame = pd.DataFrame({"layer": [-1, 0, 1, 2, 3], "refusal score": [5, 1, -2, -3, -9], "KL": [0, .05, .05, .5, 0]})
    assert layer_selection.select_layer(frame, 3, fallback=2)[0] == 1  # layer 2 breaks the KL bound, 3 is too deep
    layer, why = layer_selection.select_layer(frame.assign(KL=1.0), 3, fallback=2)
    assert layer == 2 and "paper" in why


def test_coarse_sweep_is_refined_around_its_best_layer(tiny, prompts):
    assert tiny.info.n_layers >= 3
    candidates = directions.layer_directions(gaussian(tiny.info.n_layers, 64, 22))
    full = layer_selection.layer_sweep(tiny, candidates, split(prompts), batch_size=2)
    sweep, layer, why = layer_selection.sweep_and_select(tiny, candidates, split(prompts),
                                                         LayerRule(1, 2, float("inf"), 1.0), batch_size=2)
    coarse = set(range(1, tiny.info.n_layers, 2))
    best_coarse = layer_selection.select_layer(full[full["layer"].isin(coarse | {-1})], tiny.info.n_layers, 1,
                                        float("inf"), 1.0)[0]
    expected = coarse | {n for n in (best_coarse - 1, best_coarse + 1) if 1 <= n < tiny.info.n_layers}
    assert set(sweep["layer"]) - {-1} == expected and sweep["layer"].is_monotonic_increasing
    by_layer = full.set_index("layer")
    assert sweep.set_index("layer")["refusal score"].to_dict() == pytest.approx(
        by_layer.loc[sweep["layer"], "refusal score"].to_dict())
    assert layer == layer_selection.select_layer(full[full["layer"].isin(expected | {-1})], tiny.info.n_layers, 1,
                                          float("inf"), 1.0)[0]
    assert ("stride 2" in why) == (expected != coarse)
    with pytest.raises(ValueError, match="stride"):
        layer_selection.sweep_and_select(tiny, candidates, split(prompts), LayerRule(1, stride=0))


def test_a_fallback_layer_is_not_refined(tiny, prompts):
    """No layer meets a negative KL bound: the paper's layer is returned, and no layers are swept next to it."""
    candidates = directions.layer_directions(gaussian(tiny.info.n_layers, 64, 22))
    sweep, layer, why = layer_selection.sweep_and_select(tiny, candidates, split(prompts),
                                                         LayerRule(1, 2, -1.0, 1.0), batch_size=2)
    assert layer == 1 and set(sweep["layer"]) == {-1, *range(1, tiny.info.n_layers, 2)}
    assert why == "no layer kept the harmless KL under -1.0: the paper's relative layer"


def test_select_layers_sweeps_each_variant_in_its_own_weights(tiny_family, prompts):
    lm = models.load("tiny-llama", "base", device="cpu")
    candidates = {v: directions.layer_directions(gaussian(lm.info.n_layers, 64, 30 + i))
                  for i, v in enumerate(("base", "lora"))}
    rule = LayerRule(1, max_kl=float("inf"), max_depth=1.0)
    sweeps, chosen, reasons = layer_selection.select_layers(
        Config("tiny-llama", device="cpu", score_batch_size=2), ["base", "lora"], candidates, split(prompts), rule)
    assert list(chosen) == ["base", "lora"] and set(sweeps["variant"]) == {"base", "lora"}
    alone = layer_selection.sweep_and_select(lm, candidates["base"], split(prompts), rule, batch_size=2)
    assert chosen["base"] == alone[1] and reasons["base"] == alone[2]
    base = sweeps[sweeps["variant"] == "base"].drop(columns="variant").reset_index(drop=True)
    pd.testing.assert_frame_equal(base, alone[0])
    table = layer_selection.selection_table(sweeps, chosen, reasons).set_index("variant")
    row = base.set_index("layer").loc[chosen["base"]]
    assert table.loc["base", "chosen layer"] == chosen["base"]
    assert table.loc["base", "score when ablated"] == row["refusal score"]
    assert table.loc["base", "KL at chosen layer"] == row["KL"]
    assert table.loc["base", "unablated refusal score"] == base.set_index("layer").loc[-1, "refusal score"]
    assert table.loc["lora", "why"] == reasons["lora"]


def test_selection_statement_says_which_layers_fell_back():
    import pandas as pd

    from lib.layer_selection import LayerRule, selection_statement

    def sweep(variant, kls):
        return pd.DataFrame([{"variant": variant, "layer": -1, "refusal score": 5.0, "KL": 0.0}] +
                            [{"variant": variant, "layer": i, "refusal score": -float(i), "KL": kl}
                             for i, kl in enumerate(kls, 1)])

    sweeps = pd.concat([sweep("a", [0.3, 0.2, 0.5, 0.6]), sweep("b", [0.05, 0.3, 0.4, 0.5])], ignore_index=True)
    statement = selection_statement(sweeps, {"a": 3, "b": 1}, 5, LayerRule(fallback=3, max_kl=0.1))
    assert statement == ("The rule chose b at layer 1 (KL 0.050). No layer of the sweep kept the harmless KL under 0.1 "
                         "for a (the smallest KL, 0.200, was at layer 2), so it is attacked at the fallback, layer 3, "
                         "where ablation moves the harmless first token by 0.500 nats.")
