"""Longer generations: does the paper's 64-token budget hide refusals that begin later, or answers cut before they
show what they are? Each refusing model (SSFT, AT, LAT), as it is and with its own direction zero-ablated, generates
once at the longest budget, and the same answers are judged cut at each shorter budget and in full, so a change in
the refusal rate comes from the extra tokens alone. A check of the judge-audit chapter, kept apart from
``lib.audit`` (a judge against the hand-labelled gold set) because it generates afresh and has no gold labels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import pandas as pd

from lib import ablation, data, directions, evaluation, models
from lib.audit import NONE, ZERO
from lib.generation import generate_prefixes
from lib.judges import COMPLIANCE, REFUSAL, bootstrap_rate_difference, content_judge_all, judge_all


def length_check(family: str = "smollm2-135m", seed: int = 42, n: int = 24, lengths: Sequence[int] = (64, 128),
                 batch_size: int = 64, device: str = "auto", dtype: str = "auto") -> list[dict]:
    """Each refusing model (SSFT, AT, LAT) as it is and with its own direction zero-ablated, on the first ``n``
    harmful test prompts: one greedy generation of ``max(lengths)`` new tokens, decoded at every budget in
    ``lengths`` (``lib.generation.generate_prefixes``), so the budgets are compared on the same answers. Cached
    like ``lib.evaluation.evaluate``. One dict per condition: model, condition, prompts, ``{length: completions}``."""
    harmful = data.test_prompts("offline", n, seed)["harmful"]
    stored, meta = directions.load_directions(family)

    def both_conditions(lm) -> list[dict]:
        variant = lm.info.variant
        directions.check_matches(meta, lm.info)
        unit = stored[variant]["unit"][meta["chosen_layers"][variant]]
        runs = []
        for condition, intervention in ((NONE, None), (ZERO, ablation.Intervention("ablate", unit))):
            compute = functools.partial(_texts_by_length, lm, harmful, lengths, batch_size, f"{variant} {condition}")
            result = evaluation.cached_generation(lm, harmful, intervention, compute, "lengths-", lengths=sorted(lengths))
            runs.append({"model": variant, "condition": condition, "prompts": harmful,
                         "completions": {int(length): texts for length, texts in result.items()}})
        return runs

    refusing = [v for v in ("ssft", "at", "lat") if v in stored]
    return [run for runs in models.for_each_model(family, refusing, both_conditions, device, dtype).values()
            for run in runs]


def _texts_by_length(lm, prompts: Sequence[str], lengths: Sequence[int], batch_size: int, desc: str) -> dict:

    texts, _ = generate_prefixes(lm, prompts, lengths, batch_size, desc=desc)
    return {str(length): texts[length] for length in lengths}


def length_table(runs: Sequence[dict], n_boot: int = 2000, seed: int = 0):
    """Per condition of ``length_check``: the refusal rate (the paper's judge; the content judge's is the same) and
    the content judge's compliance rate at the shortest and the longest budget, and the change in refusal from
    the shortest to the longest, in points, with a 95% paired bootstrap interval over prompts."""
    rows = []
    for run in runs:
        short, long = min(run["completions"]), max(run["completions"])
        refusals = {length: judge_all(run["completions"][length]) for length in (short, long)}
        content = {length: content_judge_all(run["completions"][length], run["prompts"]) for length in (short, long)}
        change = bootstrap_rate_difference(refusals[long], refusals[short], REFUSAL, n_boot=n_boot, seed=seed)
        row = {"model": run["model"], "condition": run["condition"], "n": len(run["prompts"])}
        for length in (short, long):
            row[f"refusal % ({length})"] = 100 * refusals[length].count(REFUSAL) / len(run["prompts"])
        row.update({"change": change["difference"], "low": change["low"], "high": change["high"]})
        for length in (short, long):
            row[f"compliance % ({length})"] = 100 * content[length].count(COMPLIANCE) / len(run["prompts"])
        rows.append(row)
    return pd.DataFrame(rows)


def length_statement(table) -> str:
    """One sentence on ``length_table``: the range of the refusal changes and the conditions whose 95% interval
    excludes 0."""
    budgets = [c[len("refusal % ("):-1] for c in table.columns if c.startswith("refusal % (")]
    moved = table[(table["low"] > 0) | (table["high"] < 0)]
    where = ("no interval excludes 0" if moved.empty else
             "the interval excludes 0 for " + ", ".join(f"{r['model']} ({r['condition']}: {r['change']:+.1f})"
                                                        for _, r in moved.iterrows()))
    return (f"From {budgets[0]} to {budgets[-1]} new tokens, the refusal rate of the {len(table)} conditions "
            f"changes by {table['change'].min():+.1f} to {table['change'].max():+.1f} points; {where}.")
