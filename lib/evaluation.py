"""Generated, judged and cached completions: greedy answers of a model under an intervention (or none), each
labelled by the paper's keyword judge, stored as a JSON artifact keyed by everything that made them, so a later
chapter that needs the same condition reads it instead of generating it again."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from lib.artifacts import artifact_path, cache_key, cached_json, sha256_text
from lib import generation
from lib.judges import judge_all
from lib.models import LoadedModel, for_each_model


def judged_completions(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 32,
                       desc: str = "generate") -> dict[str, list[str]]:
    """Greedy completions of ``prompts`` and the paper's label for each: ``{"completions": [...], "labels": [...]}``."""
    completions = generation.generate(lm, prompts, max_new_tokens, batch_size, desc=desc)
    return {"completions": completions, "labels": judge_all(completions)}


def evaluate_pairs(lm: LoadedModel, pairs: Sequence, max_new_tokens: int = 64, batch_size: int = 32) -> dict:
    """Judged greedy completions for the harmful prompts and the harmless twins of ``pairs``:
    ``{"harmful": {...}, "harmless": {...}}`` with ``completions`` and ``labels`` lists in pair order, each half
    cached by ``evaluate`` (so a later chapter judging the same prompts reuses it)."""
    return {kind: evaluate(lm, [getattr(p, kind) for p in pairs], None, max_new_tokens, batch_size,
                           desc=f"{lm.info.variant} {kind}") for kind in ("harmful", "harmless")}


def evaluate(lm: LoadedModel, prompts: Sequence[str], intervention=None, max_new_tokens: int = 64,
             batch_size: int = 32, desc: str = "generate") -> dict[str, list[str]]:
    """Judged greedy completions of ``prompts`` under ``intervention`` (an object with ``key()`` and
    ``applied(lm)``, e.g. ``lib.ablation.Intervention``; None for the model as it is), cached
    (``cached_generation``)."""
    return cached_generation(lm, prompts, intervention,
                             lambda: judged_completions(lm, list(prompts), max_new_tokens, batch_size, desc=desc),
                             max_new_tokens=max_new_tokens)


def evaluate_models(family: str, conditions: dict[str, dict], prompts: Sequence[str], max_new_tokens: int = 64,
                    batch_size: int = 32, device: str = "auto", dtype: str = "auto") -> dict[tuple[str, str], dict]:
    """``evaluate`` of ``prompts`` in several models, each loaded once: ``conditions`` maps a variant to
    ``{condition name: intervention or None}``. Returns ``{(variant, condition name): {"completions", "labels"}}``
    in the order given."""
    def evaluate_conditions(lm: LoadedModel) -> dict:
        return {name: evaluate(lm, prompts, intervention, max_new_tokens, batch_size,
                               desc=f"{lm.info.variant}: {name}")
                for name, intervention in conditions[lm.info.variant].items()}

    runs = for_each_model(family, list(conditions), evaluate_conditions, device, dtype)
    return {(variant, name): run for variant, by_name in runs.items() for name, run in by_name.items()}


def cached_generation(lm: LoadedModel, prompts: Sequence[str], intervention, compute, kind: str = "", **settings):
    """``compute()`` run with ``intervention`` applied to ``lm`` (None: the model as it is) and cached as a JSON
    artifact under ``evaluations/<family>/<variant>/``, keyed by the model, the prompts, the intervention, the
    chat template, the dtype, ``settings`` and lib's code; ``kind`` prefixes the file name. Shared by ``evaluate``
    and the judge audit's length check (``lib.long_generations``), so every generated condition is cached the same
    way."""
    info = lm.info
    condition = "none" if intervention is None else intervention.key()
    key = cache_key(model=info.fingerprint, prompts=sha256_text("\0".join(prompts)), intervention=condition,
                    template=info.template.template, dtype=str(info.dtype), **settings)
    path = artifact_path("evaluations", info.family, info.variant, f"{kind}{condition}-{key}.json")

    def run():
        with contextlib.nullcontext() if intervention is None else intervention.applied(lm):
            return compute()

    return cached_json(path, key, run)

