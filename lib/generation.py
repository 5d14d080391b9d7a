"""Batched greedy generation with a KV cache; any hooks active around the call (ablation, addition) apply to
every forward pass, prompt and generated tokens alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lib.capture import order_by_length, prompt_lengths
from lib.models import LoadedModel, encode
from lib.runtime import auto_batch_size, progress

DEFAULT_BATCH_SIZE = 32  # on 2 CPU cores, 32 prompts per batch generate ~2x faster per prompt than 8


def generate(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 64,
             batch_size: int | None = DEFAULT_BATCH_SIZE, desc: str = "generate",
             with_finished: bool = False) -> list[str] | tuple[list[str], list[bool]]:
    """Greedy completions (special tokens stripped) for ``prompts``, in prompt order; with ``with_finished``, also
    whether each completion ended with an end-of-turn token before ``max_new_tokens``.

    Prompts are batched by tokenised length (stable order), so a rerun with the same inputs is byte-identical.
    ``batch_size=None`` picks the largest power of two that fits the free memory (``lib.runtime.auto_batch_size``).
    """
    from transformers import GenerationConfig

    if not prompts:
        raise ValueError("The prompt list is empty; pass at least one prompt.")
    if batch_size is None:
        batch_size = auto_batch_size(lm, max(prompt_lengths(lm, prompts)), max_new_tokens)
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1.")
    tokenizer = lm.tokenizer
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=lm.model.generation_config.eos_token_id or tokenizer.eos_token_id)
    order = order_by_length(lm, prompts)
    completions: list[str] = [""] * len(prompts)
    finished: list[bool] = [False] * len(prompts)
    stop_ids = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for rows in progress(batches, desc=desc):
            batch = encode(lm, [prompts[i] for i in rows])
            output = lm.model.generate(**batch, generation_config=config)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            ended = torch.isin(new_tokens, torch.tensor(stop_ids, device=new_tokens.device)).any(dim=1)
            for row, text, done in zip(rows, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), ended):
                completions[row] = text.strip()
                finished[row] = bool(done)
    return (completions, finished) if with_finished else completions
