"""Batched greedy generation with a KV cache; any hooks active around the call (ablation, addition) apply to
every forward pass, prompt and generated tokens alike."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from lib.capture import order_by_length, prompt_lengths
from lib.inputs import check_prompts, encode
from lib.models import LoadedModel
from lib.runtime import auto_batch_size, packed_linears, packed_linears_requested, progress

DEFAULT_BATCH_SIZE = 32  # on 2 CPU cores, 32 prompts per batch generate ~2x faster per prompt than 8


def generate(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 64,
             batch_size: int | None = DEFAULT_BATCH_SIZE, desc: str = "generate",
             with_finished: bool = False) -> list[str] | tuple[list[str], list[bool]]:
    """Greedy completions (special tokens stripped) for ``prompts``, in prompt order; with ``with_finished``, also
    whether each completion ended with an end-of-turn token before ``max_new_tokens``.

    Prompts are batched by tokenised length (stable order), so a rerun with the same inputs is byte-identical.
    ``batch_size=None`` picks the largest power of two that fits the free memory (``lib.runtime.auto_batch_size``).
    """
    texts, finished = generate_prefixes(lm, prompts, (max_new_tokens,), batch_size, desc)
    return (texts[max_new_tokens], finished) if with_finished else texts[max_new_tokens]


def generate_prefixes(lm: LoadedModel, prompts: Sequence[str], lengths: Sequence[int],
                      batch_size: int | None = DEFAULT_BATCH_SIZE, desc: str = "generate"
                      ) -> tuple[dict[int, list[str]], list[bool]]:
    """One greedy generation of ``max(lengths)`` new tokens per prompt, decoded at every length in ``lengths``
    (``{length: completions}``: the first ``length`` tokens of the same answer, so a longer budget can be compared
    with a shorter one on identical text), and whether each answer ended before the longest budget."""
    from transformers import GenerationConfig

    check_prompts(prompts)
    max_new_tokens = max(lengths) if lengths else 0
    if batch_size is None:
        batch_size = auto_batch_size(lm, max(prompt_lengths(lm, prompts)), max_new_tokens)
    if min(lengths or (0,)) < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens ({', '.join(map(str, lengths)) or 'none'}) and batch_size ({batch_size}) "
                         "must be >= 1.")
    tokenizer = lm.tokenizer
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=lm.model.generation_config.eos_token_id or tokenizer.eos_token_id)
    order = order_by_length(lm, prompts)
    completions = {length: [""] * len(prompts) for length in lengths}
    finished: list[bool] = [False] * len(prompts)
    stop_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    faster = packed_linears(lm.model) if packed_linears_requested() else contextlib.nullcontext()
    with torch.inference_mode(), faster:
        for rows in progress(batches, desc=desc):
            batch = encode(lm, [prompts[i] for i in rows])
            output = lm.model.generate(**batch, generation_config=config)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            ended = torch.isin(new_tokens, torch.tensor(stop_ids, device=new_tokens.device)).any(dim=1)
            for length in lengths:
                for row, text in zip(rows, tokenizer.batch_decode(new_tokens[:, :length], skip_special_tokens=True)):
                    completions[length][row] = text.strip()
            for row, done in zip(rows, ended):
                finished[row] = bool(done)
    return completions, finished
