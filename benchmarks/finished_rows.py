"""Issue 22's lever, now lib's: ``lib.generation`` drops a row from the batch as soon as it has produced an
end-of-turn token, where ``transformers``' ``generate`` (what lib called before 2026-12-01) keeps decoding padding
for it until the longest answer is done. Refusals are short, so the batches of a refusing model shrink fast. This
module keeps the old path as the reference: ``generate_keeping_finished_rows`` is ``lib.generation.generate`` with
its decoding loop replaced by ``generate``; ``make bench --sections levers`` and ``python -m
benchmarks.finished_rows`` run the two side by side and count identical completions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from unittest import mock

import torch


def keeping_finished_rows(lm, batch, max_new_tokens: int, stop_ids: torch.Tensor) -> torch.Tensor:
    """``lib.generation.greedy_tokens`` as ``transformers``' greedy ``generate`` computes it (every row decoded
    until the last one stops)."""
    output = lm.model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                               pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=stop_ids.tolist())
    return output[:, batch["input_ids"].shape[1]:]


def generate_keeping_finished_rows(lm, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """``lib.generation.generate`` with ``generate``'s decoding loop: the reference for lib's."""
    from lib import generation

    with mock.patch.object(generation, "greedy_tokens", keeping_finished_rows):
        return generation.generate(lm, prompts, max_new_tokens, batch_size)


def compare_on_book_conditions(variants: Sequence[str] = ("ssft", "lat"), n: int = 64, max_new_tokens: int = 64,
                               batch_size: int = 64, family: str = "smollm2-135m") -> list[dict]:
    """``generate_keeping_finished_rows`` and ``lib.generation.generate`` side by side on conditions the book generates:
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
            for generator in (generate_keeping_finished_rows, generation.generate):
                start = time.perf_counter()
                with ablation.orthogonalized(lm, unit) if ablated else contextlib.nullcontext():
                    outputs.append(generator(lm, prompts, max_new_tokens, batch_size))
                seconds.append(time.perf_counter() - start)
            rows.append({"model": variant, "prompts": kind + (", own direction ablated" if ablated else ""),
                         "keeping rows s": round(seconds[0], 1), "lib generate s": round(seconds[1], 1),
                         "ratio": round(seconds[0] / seconds[1], 2),
                         "same completions": f"{sum(a == b for a, b in zip(*outputs))}/{len(prompts)}"})
    return rows


if __name__ == "__main__":  # python -m benchmarks.finished_rows (after chapter 04 has stored its directions)
    from benchmarks import common

    print(common.markdown_table(compare_on_book_conditions(), ["model", "prompts", "keeping rows s", "lib generate s",
                                                               "ratio", "same completions"]))
