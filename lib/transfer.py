"""The transfer stage: every source's refusal direction ablated in every target model.

Measured two ways. ``transfer_matrix`` generates and judges (the paper's measure, zero ablation by default).
``mode_matrix`` scores without generation (the refusal score on harmful prompts, the first-token KL on harmless
ones) under zero ablation and both definitions of mean ablation (``lib.ablation``) and a push-matched control per
source (``lib.anatomy``), and ``mode_contrasts`` turns it into the claim-1 and claim-3 verdicts under each mode,
with the rule that says which verdicts survive every mode. ``score_matrix``, ``subspace_gains`` and ``gain_modes``
serve the subspace attacks of "Beyond the paper". ``band_matrix`` and ``band_verdicts`` repeat the generation-free
verdicts at every layer of a band around the chosen one, so that a verdict that holds at one layer only shows as
such.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from lib.ablation import BLOCK_INPUTS, Intervention, ablation_means
from lib.anatomy import condition_scores, matched_control
from lib.claims import (ABLATION_MODES, CLAIM1_MODES_ROW, MODE_COLUMNS, across_layers, claim1_word,
                        claim3_verdicts, transfer_contrasts)
from lib.config import Config
from lib.evaluation import evaluate
from lib.judges import bootstrap_mean_difference
from lib.models import for_each_model
from lib.stats import ON_THE_EDGE, verdict


def transfer_matrix(config: Config, sources: dict[str, torch.Tensor], targets: Sequence[str], prompts: Sequence[str],
                    max_new_tokens: int = 64, baseline: bool = True, mode: str = "zero",
                    reference: Sequence[str] | None = None) -> dict[tuple[str, str], dict[str, list[str]]]:
    """Judged greedy completions of ``prompts`` for every source direction ablated in every target variant of
    ``config.family`` (each target loaded once, batches of ``config.batch_size``), plus the unablated target as
    source ``"none"`` when ``baseline``. ``mode``: "zero" (the paper's) or "mean" (each target's own means over the
    harmless ``reference`` prompts). Every condition is cached (``lib.evaluation.evaluate``). Returns
    ``{(source, target): {"completions": [...], "labels": [...]}}``."""
    batch_size = config.batch_size

    def one_target(lm) -> dict:
        target = lm.info.variant
        runs = {"none": evaluate(lm, prompts, None, max_new_tokens, batch_size, desc=f"{target}")} if baseline else {}
        means = ablation_means(lm, mode, reference)
        for source, direction in sources.items():
            intervention = Intervention("ablate", direction, label=f"{source} direction", mode=mode, means=means)
            runs[source] = evaluate(lm, prompts, intervention, max_new_tokens, batch_size, desc=f"{source} -> {target}")
        return runs

    by_target = for_each_model(config.family, targets, one_target, config.device, config.dtype)
    return {(source, target): run for target, runs in by_target.items() for source, run in runs.items()}


def score_matrix(config: Config, sources: dict[str, torch.Tensor], targets: Sequence[str], prompts: Sequence[str],
                 mode: str = "zero", reference: Sequence[str] | None = None, baseline: bool = True):
    """Generation-free transfer matrix: the mean refusal score (log-odds of a refusal opening) on ``prompts`` for
    every named source subspace (``[d]`` or ``[k, d]``) ablated in every target (batches of
    ``config.score_batch_size``), plus the unablated target (source ``"none"``) when ``baseline``, each with a 95%
    bootstrap interval over prompts (``config.n_boot`` resamples, ``lib.anatomy.condition_scores``). A DataFrame
    (source, target, score, low, high, n, per_prompt); ``per_prompt`` holds each prompt's score, for paired
    comparisons (``subspace_gains``). ``mode``/``reference`` as in ``transfer_matrix``."""
    batch_size, n_boot, seed = config.score_batch_size, config.n_boot, config.seed

    def one_target(lm):
        means = ablation_means(lm, mode, reference, batch_size)
        conditions = {**({"none": None} if baseline else {}),
                      **{source: Intervention("ablate", subspace, mode=mode, means=means).applied
                         for source, subspace in sources.items()}}
        scores = condition_scores(lm, conditions, prompts, None, batch_size, n_boot, seed)
        return (scores.rename(columns={"refusal score": "score"}).rename_axis("source").reset_index()
                .assign(target=lm.info.variant))

    frames = for_each_model(config.family, targets, one_target, config.device, config.dtype).values()
    return pd.concat(frames, ignore_index=True)[["source", "target", "score", "low", "high", "n", "per_prompt"]]


def subspace_gains(scores, sources: Sequence[str], ks: Sequence[int], n_boot: int = 2000, seed: int = 0):
    """How much each extra dimension adds to a subspace attack: for every source, target and consecutive k -> k', the
    change in mean refusal score when ``"<source>, k=<k>"`` grows to ``"<source>, k=<k'>"`` (negative: the larger
    subspace lowers the refusal score more), with a 95% paired bootstrap interval over prompts. ``scores`` as made by
    ``score_matrix``. A DataFrame (source, target, from, to, change, low, high, n)."""
    by = scores.set_index(["source", "target"])["per_prompt"]
    rows = []
    for source in sources:
        for target in dict.fromkeys(scores["target"]):
            for a, b in zip(ks, ks[1:]):
                small, large = by[(f"{source}, k={a}", target)], by[(f"{source}, k={b}", target)]
                gap = bootstrap_mean_difference(large, small, n_boot, seed)
                rows.append({"source": source, "target": target, "from": f"k={a}", "to": f"k={b}",
                             "change": gap["difference"], "low": gap["low"], "high": gap["high"], "n": gap["n"]})
    return pd.DataFrame(rows)


GAIN_WORDS = ("score falls less", "score falls more", "no difference")  # the refusal score, not refusal itself


def gain_modes(gains_by_mode: dict) -> tuple:
    """Which subspace-growth verdicts survive both ablation modes. ``gains_by_mode`` maps a mode ("zero", "mean") to
    a ``subspace_gains`` frame of the same sources, targets and steps. Per (source, step, target): the verdict under
    each mode ("score falls more": the larger subspace lowers the refusal score more, the interval lies below 0;
    "score falls less" above 0; else "no difference") and whether they agree. Returns (DataFrame, a statement: the
    number of verdicts that change, and per source and step how many targets had each verdict, under each mode
    where they differ and once where both modes agree)."""
    if set(gains_by_mode) != {"zero", "mean"}:
        raise ValueError(f"gain_modes needs subspace gains under 'zero' and 'mean', got {sorted(gains_by_mode)}.")
    keys = ["source", "from", "to", "target"]
    table = None
    for mode, gains in gains_by_mode.items():
        words = [verdict(lo, hi, *GAIN_WORDS) for lo, hi in zip(gains["low"], gains["high"])]
        column = gains[keys].assign(**{f"{mode} ablation": words})
        table = column if table is None else table.merge(column, on=keys, how="outer", validate="one_to_one")
    if table[["zero ablation", "mean ablation"]].isna().any().any():
        raise ValueError("The zero- and mean-ablation gains cover different sources, steps or targets.")
    table["same under both"] = table["zero ablation"] == table["mean ablation"]
    changed_steps, held_steps = [], []
    for (source, a, b), group in table.groupby(["source", "from", "to"], sort=False):
        counts = {mode: _verdict_counts(group[f"{mode} ablation"]) for mode in ("zero", "mean")}
        if group["same under both"].all():
            held_steps.append(f"{source} {a} to {b} ({counts['zero']} of {len(group)} targets)")
        else:
            changed_steps.append(f"{source} {a} to {b} ({counts['zero']} of {len(group)} targets under zero "
                                 f"ablation; {counts['mean']} under mean ablation)")
    changed = int((~table["same under both"]).sum())
    head = f"{changed} of {len(table)} subspace-growth verdicts change between zero and mean ablation"
    sentences = [f"{head}: {'; '.join(changed_steps)}." if changed_steps else f"{head}."]
    if held_steps:
        sentences.append(f"The same under both modes: {'; '.join(held_steps)}.")
    return table.set_index(keys), " ".join(sentences)


def _verdict_counts(words: pd.Series) -> str:
    """How many targets had each growth verdict, e.g. "score falls more in 2, no difference in 2"."""
    return ", ".join(f"{word} in {n}" for word in (*GAIN_WORDS, ON_THE_EDGE) if (n := int((words == word).sum())))


MODE_CONDITIONS = (*ABLATION_MODES, "control")
SCORE, CHANGE = "score", "change from unablated"  # the two readings of the claim-3 contrasts (``mode_contrasts``)
SAME = "same in every column"


def mode_matrix(config: Config, sources: dict[str, torch.Tensor], layers: dict[str, int], targets: Sequence[str],
                harmful: Sequence[str], harmless: Sequence[str], reference: Sequence[str]):
    """The transfer matrix scored without generation, under every ablation mode, with a push-matched control.

    For every target (loaded once) and source direction: ``zero`` (the paper's ablation), ``mean`` (coordinates set
    to the target's harmless means at the last token of ``reference`` at every write site), ``mean-inputs`` (the
    same, at each block's input only, ``lib.ablation.BLOCK_INPUTS``) and ``control`` (zero ablation of a random
    unit direction orthogonal to the source's with the same harmless mean projection in the target at the source's
    layer ``layers[source]``: the same push, none of the direction), plus the unablated target (source "none").
    Each: the mean refusal score on ``harmful`` with a 95% bootstrap interval, the mean first-token KL on
    ``harmless`` (damage), and the per-prompt scores. A DataFrame (source, target, condition, score, low, high,
    KL, n, per_prompt). Batches of ``config.score_batch_size``; ``config.n_boot`` resamples and ``config.seed``."""
    batch_size, n_boot, seed = config.score_batch_size, config.n_boot, config.seed

    def one_target(lm):
        means = ablation_means(lm, "mean", reference, batch_size)
        conditions = {("none", "none"): None}
        for source, direction in sources.items():
            control = matched_control(direction, means[layers[source], 0], seed)
            for condition, intervention in (
                    ("zero", Intervention("ablate", direction)),
                    ("mean", Intervention("ablate", direction, mode="mean", means=means)),
                    ("mean-inputs", Intervention("ablate", direction, mode="mean", means=means, sites=BLOCK_INPUTS)),
                    ("control", Intervention("ablate", control))):
                conditions[(source, condition)] = intervention.applied
        scores = condition_scores(lm, conditions, harmful, harmless, batch_size, n_boot, seed)
        frame = scores.reset_index().rename(columns={"refusal score": "score", "harmless KL": "KL"})
        frame[["source", "condition"]] = pd.DataFrame(frame.pop("condition").tolist(), index=frame.index)
        return frame.assign(target=lm.info.variant)

    frames = for_each_model(config.family, targets, one_target, config.device, config.dtype).values()
    columns = ["source", "target", "condition", "score", "low", "high", "KL", "n", "per_prompt"]
    return pd.concat(frames, ignore_index=True)[columns]


def control_damage(frame) -> str:
    """How the push-matched controls' damage compares with their sources': in a ``mode_matrix`` frame, the number
    of (source, target) cells whose control has a lower harmless KL than zero ablation of the source, and the range
    and median of the control's KL as a share of the source's. The control matches the push, not the damage, so
    where it does less damage a source that beats it may do so partly through damage."""
    kl = frame[frame["condition"].isin(("zero", "control"))].pivot_table(
        index=["source", "target"], columns="condition", values="KL", sort=False)
    share = kl["control"] / kl["zero"]
    return (f"the control's harmless KL is below its source's in {int((share < 1).sum())} of {len(share)} cells, "
            f"at {share.min():.0%} to {share.max():.0%} of it (median {share.median():.0%}).")


def mode_contrasts(frame, focus: str = "lat", others: Sequence[str] = ("ssft", "at"), n_boot: int = 2000,
                   seed: int = 0, modes: Sequence[str] = tuple(ABLATION_MODES)) -> dict:
    """Claims 1 and 3 from a ``mode_matrix``, under each ablation mode (``lib.claims.ABLATION_MODES``: zero, mean
    at every write site, mean at the block inputs), on the same prompts:

    - ``claim3``: the contrasts of ``lib.claims.transfer_contrasts`` per mode, in two readings: on the
      refusal scores themselves (``reading`` "score", the paper's form: how much refusal is left) and on each
      prompt's change from its target's unablated score ("change from unablated": how much was removed). The
      paper's rates start near 100% in every model, so the two agree there; scores do not start level, and a
      verdict that holds in one reading only rests on the targets' different starting points;
    - ``claim1``: per model, the drop in mean refusal score when its own direction is ablated (unablated minus
      ablated; paired bootstrap), per mode, with the verdict "refusal drops" / "refusal rises" / "not resolved";
    - ``controls``: per cell, the source's zero-ablation score minus its matched control's (paired bootstrap):
      "direction beats its control" when the interval lies below 0; otherwise the control (the push alone) moves
      refusal as much, and the cell measures the push, not the direction (empty where the frame has no controls).

    ``modes``: the ablation modes to read (those of ``frame``). Returns ``{"claim3": DataFrame, "claim1": DataFrame,
    "controls": DataFrame}``."""
    scores = frame.set_index(["source", "target", "condition"])["per_prompt"]
    targets = list(dict.fromkeys(frame["target"]))
    claim3, claim1, controls = [], [], []
    for mode in modes:
        values = {(s, t): scores[(s, t, mode)] for s, t, c in scores.index if c == mode}
        changes = {(s, t): [a - b for a, b in zip(v, scores[("none", t, "none")])] for (s, t), v in values.items()}
        for reading, cells in ((SCORE, values), (CHANGE, changes)):
            claim3 += [{"mode": mode, "reading": reading, **row}
                       for row in transfer_contrasts(cells, focus, others, n_boot, seed)]
        for model in [m for m in (focus, *others) if m in targets]:
            drop = bootstrap_mean_difference(scores[("none", model, "none")], scores[(model, model, mode)], n_boot,
                                             seed)
            claim1.append({"mode": mode, "model": model, **drop,
                           "verdict": verdict(drop["low"], drop["high"], "refusal drops", "refusal rises",
                                              "not resolved")})
    for s, t, c in scores.index:
        if c == "zero" and (s, t, "control") in scores.index:
            gap = bootstrap_mean_difference(scores[(s, t, "zero")], scores[(s, t, "control")], n_boot, seed)
            controls.append({"source": s, "target": t, **gap,
                             "verdict": verdict(gap["low"], gap["high"], "control stronger",
                                                "direction beats its control", "no difference: the push alone")})
    return {"claim3": pd.DataFrame(claim3), "claim1": pd.DataFrame(claim1), "controls": pd.DataFrame(controls)}


def surviving(claim3, claim1) -> tuple:
    """Which verdicts survive every ablation mode and both readings of ``mode_contrasts``: per claim-3 contrast
    (its verdict against every comparison model, ``lib.claims.claim3_verdicts``) and for claim 1 (every model's
    refusal drops; a change already, so the same in both readings), the verdict in each column
    (``lib.claims.MODE_COLUMNS``: each mode, read as scores and as changes from unablated) and whether all agree.
    Returns (DataFrame, a statement that names every verdict that is not the same in every column, or says none
    is)."""
    columns = dict(zip(((mode, reading) for reading in (SCORE, CHANGE) for mode in ABLATION_MODES), MODE_COLUMNS))
    verdicts: dict[str, dict[str, str]] = {}
    for (mode, reading), group in claim3.groupby(["mode", "reading"], sort=False):
        for claim, word in claim3_verdicts(group.to_dict("records")).items():
            verdicts.setdefault(claim, {})[columns[(mode, reading)]] = word
    claim1_verdicts = {mode: claim1_word(group["verdict"]) for mode, group in claim1.groupby("mode", sort=False)}
    verdicts[CLAIM1_MODES_ROW] = {
        column: claim1_verdicts[mode] for (mode, _), column in columns.items()}
    table = pd.DataFrame([{"claim": claim, **v} for claim, v in verdicts.items()]).set_index("claim")
    table = table[list(columns.values())]
    table[SAME] = table.nunique(axis=1) == 1
    flips = [f"{claim}: " + ", ".join(f"{row[column]} under {column.replace(', change', ' (change)')}"
                                      for column in columns.values())
             for claim, row in table.iterrows() if not row[SAME]]
    where = ("under zero ablation and both definitions of mean ablation, read as scores and as changes from the "
             "unablated score")
    if not flips:
        return table, f"Every verdict is the same {where}."
    return table, f"{len(flips)} of {len(table)} verdicts are not the same {where}. {'. '.join(flips)}."


BAND_MODES = ("zero", "mean")  # the modes of the layer band: the paper's, and mean ablation at every write site


def band_matrix(config: Config, units: dict[str, torch.Tensor], band: Sequence[int], targets: Sequence[str],
                harmful: Sequence[str], reference: Sequence[str]):
    """The generation-free transfer matrix at every layer of ``band``: in each target (loaded once), each source's
    unit direction taken at layer L (``units[source]`` is [n_layers, d]) ablated under each of ``BAND_MODES``
    (mean ablation with the target's own harmless means at the last token of ``reference``), scored on
    ``harmful`` (no KL: the band asks which verdicts hold, not what they cost), and the unablated target once.
    A DataFrame (layer, source, target, condition, score, low, high, n, per_prompt), the unablated rows repeated
    at every layer so that each layer's rows form a ``mode_contrasts`` frame."""
    batch_size, n_boot, seed = config.score_batch_size, config.n_boot, config.seed

    def one_target(lm):
        means = ablation_means(lm, "mean", reference, batch_size)
        conditions = {(None, "none", "none"): None}
        for layer in band:
            for source, unit in units.items():
                for mode in BAND_MODES:
                    intervention = Intervention("ablate", unit[layer], mode=mode,
                                                means=means if mode == "mean" else None)
                    conditions[(layer, source, mode)] = intervention.applied
        scores = condition_scores(lm, conditions, harmful, None, batch_size, n_boot, seed).reset_index()
        scores[["layer", "source", "condition"]] = pd.DataFrame(scores.pop("condition").tolist(), index=scores.index)
        none = scores[scores["source"] == "none"]
        scores = pd.concat([scores[scores["source"] != "none"]] + [none.assign(layer=layer) for layer in band])
        return scores.rename(columns={"refusal score": "score"}).assign(target=lm.info.variant)

    frames = for_each_model(config.family, targets, one_target, config.device, config.dtype).values()
    columns = ["layer", "source", "target", "condition", "score", "low", "high", "n", "per_prompt"]
    frame = pd.concat(frames, ignore_index=True)[columns]
    return frame.astype({"layer": int}).sort_values(["layer", "target", "source", "condition"], kind="stable",
                                                     ignore_index=True)


def band_verdicts(frame, focus: str = "lat", others: Sequence[str] = ("ssft", "at"), n_boot: int = 2000,
                  seed: int = 0) -> dict:
    """Claims 1 and 3 at every layer of a ``band_matrix``, under each of ``BAND_MODES``, read on the scores (the
    paper's form): ``{"claim3": contrasts per layer (``mode_contrasts``' rows with a layer column), "claim1":
    drops per layer, "verdicts": one row per (claim, layer) with the verdict under each mode}``. Claim 3's verdict
    at a layer is ``lib.claims.claim3_verdicts`` of that layer's contrasts; claim 1's is "supported" when every
    model's own direction lowers its score there."""
    claim3, claim1, rows = [], [], []
    for layer, cells in frame.groupby("layer", sort=True):
        result = mode_contrasts(cells, focus, others, n_boot, seed, BAND_MODES)
        scored = result["claim3"][result["claim3"]["reading"] == SCORE].assign(layer=layer)
        claim3.append(scored)
        claim1.append(result["claim1"].assign(layer=layer))
        words: dict[str, dict[str, str]] = {}
        for mode, group in scored.groupby("mode", sort=False):
            for claim, word in claim3_verdicts(group.to_dict("records")).items():
                words.setdefault(claim, {})[ABLATION_MODES[mode]] = word
        for mode, group in result["claim1"].groupby("mode", sort=False):
            words.setdefault(CLAIM1_MODES_ROW, {})[ABLATION_MODES[mode]] = claim1_word(group["verdict"])
        rows += [{"claim": claim, "layer": layer, **by_mode} for claim, by_mode in words.items()]
    return {"claim3": pd.concat(claim3, ignore_index=True), "claim1": pd.concat(claim1, ignore_index=True),
            "verdicts": pd.DataFrame(rows)}


def band_statement(verdicts) -> str:
    """``band_verdicts``' verdict table in words: per claim and mode, the verdict when it is the same at every layer
    of the band, else how many layers gave which (``lib.claims.across_layers``), at every layer (the conclusions
    read claim 3 only where claim 1 holds, ``lib.claims.replication_table``)."""
    modes = [column for column in verdicts.columns if column not in ("claim", "layer")]
    span = f"layers {verdicts['layer'].min()} to {verdicts['layer'].max()}"
    parts = [f"{claim}: " + ", ".join(f"{across_layers(dict(zip(group['layer'], group[mode])))} under {mode}"
                                      for mode in modes)
             for claim, group in verdicts.groupby("claim", sort=False)]
    return f"Across {span}: " + "; ".join(parts) + "."
