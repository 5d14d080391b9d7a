"""A lever for issue 22, measured here before it could go into lib: greedy generation that drops a row from the
batch as soon as it has produced an end-of-turn token, instead of decoding padding for it until the longest answer
is done (what ``transformers``' ``generate`` does). Refusals are short, so the batches of a refusing model shrink
fast. The loop follows ``generate``'s greedy path step by step (position ids from the attention mask, a dynamic
KV cache, logits of the last position only, argmax of float32 logits); the rows that stay are cut out of the cache
(``DynamicCache.batch_select_indices``). Whether every token stays the same is what ``make bench --sections levers``
checks, since the matrix products then run on fewer rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch


def greedy_dropping_finished(lm, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of ``prompts`` in prompt order, batched like ``lib.generation.generate`` (by tokenised
    length, stable), each batch shrinking as its rows finish."""
    from lib.capture import order_by_length
    from lib.inputs import encode

    order = order_by_length(lm, prompts)
    stop = lm.model.generation_config.eos_token_id or lm.tokenizer.eos_token_id
    stop_ids = torch.tensor(stop if isinstance(stop, list) else [stop])
    completions = [""] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            tokens = _greedy_batch(lm, encode(lm, [prompts[i] for i in rows]), max_new_tokens, stop_ids)
            for row, text in zip(rows, lm.tokenizer.batch_decode(tokens, skip_special_tokens=True)):
                completions[row] = text.strip()
    return completions


def _greedy_batch(lm, batch, max_new_tokens: int, stop_ids: torch.Tensor) -> torch.Tensor:
    from transformers import DynamicCache

    from lib.inputs import position_ids

    mask = batch["attention_mask"]
    positions = position_ids(mask)  # what generate() computes for left-padded rows
    new = torch.full((mask.shape[0], max_new_tokens), int(lm.tokenizer.pad_token_id), dtype=torch.long)
    alive = torch.arange(mask.shape[0])
    cache = DynamicCache(config=lm.model.config)
    output = lm.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, cache=cache,
                      use_cache=True, logits_to_keep=1)
    for step in range(max_new_tokens):
        token = output.logits[:, -1, :].to(dtype=torch.float32).argmax(-1)
        new[alive, step] = token
        going = ~torch.isin(token, stop_ids)
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = going.nonzero()[:, 0]
            alive, token, mask, positions = alive[keep], token[keep], mask[keep], positions[keep]
            output.cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        output = lm.model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=output.cache,
                          use_cache=True, logits_to_keep=1)
    return new


def compare_on_book_conditions(variants: Sequence[str] = ("ssft", "lat"), n: int = 64, max_new_tokens: int = 64,
                               batch_size: int = 64, family: str = "smollm2-135m") -> list[dict]:
    """``lib.generation.generate`` and ``greedy_dropping_finished`` side by side on conditions the book generates:
    each variant on the first ``n`` harmful and harmless test prompts, and on the harmful ones with its own stored
    direction orthogonalised (needs chapter 04's directions). Wall seconds of one run each, and how many
    completions are identical."""
    import time

    from lib import ablation, data, directions, generation, models

    pairs = data.split("test", 42)[:n]
    stored, meta = directions.load_directions(family)
    rows = []
    for variant in variants:
        lm = models.load(family, variant, device="cpu")
        unit = stored[variant]["unit"][meta["chosen_layers"][variant]]
        for kind, ablated in (("harmful", False), ("harmless", False), ("harmful", True)):
            prompts = [getattr(p, kind) for p in pairs]
            seconds, outputs = [], []
            for generator in (generation.generate, greedy_dropping_finished):
                start = time.perf_counter()
                with ablation.orthogonalized(lm, unit) if ablated else contextlib.nullcontext():
                    outputs.append(generator(lm, prompts, max_new_tokens, batch_size))
                seconds.append(time.perf_counter() - start)
            rows.append({"model": variant, "prompts": kind + (", own direction ablated" if ablated else ""),
                         "lib generate s": round(seconds[0], 1), "dropping s": round(seconds[1], 1),
                         "ratio": round(seconds[0] / seconds[1], 2),
                         "same completions": f"{sum(a == b for a, b in zip(*outputs))}/{len(prompts)}"})
    return rows


if __name__ == "__main__":  # python -m benchmarks.finished_rows (after chapter 04 has stored its directions)
    from benchmarks import common

    print(common.markdown_table(compare_on_book_conditions(), ["model", "prompts", "lib generate s", "dropping s",
                                                               "ratio", "same completions"]))
