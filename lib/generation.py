"""Batched greedy generation with a KV cache; any hooks active around the call (ablation, addition) apply to
every forward pass, prompt and generated tokens alike.

The decoding loop is ``transformers``' greedy ``generate`` path (position ids from the attention mask, a dynamic
KV cache, the last position's logits, argmax in float32) with one difference: a row that has produced its
end-of-turn token leaves the batch and its cache, instead of being fed padding at full cost until the longest
answer is done. Refusals are short, so a refusing model's batches shrink fast and its later steps cost less (see
BENCHMARKS.md, "Levers in the code today"); the tokens equal ``generate``'s (tested). Hooks must therefore treat rows
independently, as ablation and addition do. On a float32 CPU model the products use weights packed once for oneDNN
(``lib.packed.packed_products``), so that MKL does not re-pack every weight at every decoding step; the greedy
completions are the same as MKL's in every chapter, and ``REFUSAL_BOOK_PACKED_LINEAR=0`` turns it off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from lib.batching import auto_batch_size
from lib.capture import order_by_length, prompt_lengths
from lib.inputs import LAST_POSITION, check_prompts, encode, position_ids
from lib.models import LoadedModel
from lib.packed import packed_products
from lib.progress import progress


DEFAULT_BATCH_SIZE = 32  # 32 prompts per batch keep a CPU's matrix products busier than 8: less time per prompt


def generate(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 64,
             batch_size: int | None = DEFAULT_BATCH_SIZE, desc: str = "generate",
             with_finished: bool = False) -> list[str] | tuple[list[str], list[bool]]:
    """Greedy completions (special tokens stripped) for ``prompts``, in prompt order; with ``with_finished``, also
    whether each completion ended with an end-of-turn token before ``max_new_tokens``.

    Prompts are batched by tokenised length (stable order), so a rerun with the same inputs is byte-identical.
    ``batch_size=None`` picks the largest power of two that fits the free memory (``lib.batching.auto_batch_size``).
    """
    texts, finished = generate_prefixes(lm, prompts, (max_new_tokens,), batch_size, desc)
    return (texts[max_new_tokens], finished) if with_finished else texts[max_new_tokens]


def generate_prefixes(lm: LoadedModel, prompts: Sequence[str], lengths: Sequence[int],
                      batch_size: int | None = DEFAULT_BATCH_SIZE, desc: str = "generate"
                      ) -> tuple[dict[int, list[str]], list[bool]]:
    """One greedy generation of ``max(lengths)`` new tokens per prompt, decoded at every length in ``lengths``
    (``{length: completions}``: the first ``length`` tokens of the same answer, so a longer budget can be compared
    with a shorter one on identical text), and whether each answer ended before the longest budget."""
    check_prompts(prompts)
    max_new_tokens = max(lengths) if lengths else 0
    if batch_size is None:
        batch_size = auto_batch_size(lm, max(prompt_lengths(lm, prompts)), max_new_tokens)
    if min(lengths or (0,)) < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens ({', '.join(map(str, lengths)) or 'none'}) and batch_size ({batch_size}) "
                         "must be >= 1.")
    tokenizer = lm.tokenizer
    order = order_by_length(lm, prompts)
    completions = {length: [""] * len(prompts) for length in lengths}
    finished: list[bool] = [False] * len(prompts)
    stop_ids = torch.tensor(stop_token_ids(lm), device=lm.info.device)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with decoding(lm):
        for rows in progress(batches, desc=desc):
            new_tokens = greedy_tokens(lm, encode(lm, [prompts[i] for i in rows]), max_new_tokens, stop_ids)
            ended = torch.isin(new_tokens, stop_ids).any(dim=1)
            for length in lengths:
                for row, text in zip(rows, tokenizer.batch_decode(new_tokens[:, :length], skip_special_tokens=True)):
                    completions[length][row] = text.strip()
            for row, done in zip(rows, ended):
                finished[row] = bool(done)
    return completions, finished


def complete_batch(lm: LoadedModel, batch: dict[str, torch.Tensor], max_new_tokens: int) -> list[str]:
    """Greedy completions (special tokens stripped) of one encoded, left-padded ``batch``, in its row order: what
    ``generate`` does for each of its batches, for callers that build the batch themselves (the robustness check's
    attacks, whose hooks key on the prompt's width)."""
    stop_ids = torch.tensor(stop_token_ids(lm), device=batch["input_ids"].device)
    with decoding(lm):
        new_tokens = greedy_tokens(lm, batch, max_new_tokens, stop_ids)
    return [text.strip() for text in lm.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


@contextlib.contextmanager
def decoding(lm: LoadedModel):
    """Inference mode, with the weights packed for oneDNN on a float32 CPU model unless
    ``REFUSAL_BOOK_PACKED_LINEAR=0`` (``lib.packed.packed_products``)."""
    with torch.inference_mode(), packed_products(lm.model, "generation"):
        yield


def stop_token_ids(lm: LoadedModel) -> list[int]:
    """The end-of-turn token ids generation stops at: the model's generation config, else the tokenizer's EOS."""
    stop = lm.model.generation_config.eos_token_id or lm.tokenizer.eos_token_id
    return list(stop) if isinstance(stop, (list, tuple)) else [stop]


def greedy_tokens(lm: LoadedModel, batch: dict[str, torch.Tensor], max_new_tokens: int,
                  stop_ids: torch.Tensor) -> torch.Tensor:
    """The new tokens [rows, steps] of a greedy continuation of a left-padded ``batch``, padded after each row's
    stop token, ``steps`` being where the last row stopped (at most ``max_new_tokens``): what ``generate`` returns
    after the prompt. Finished rows are dropped from the batch and the KV cache."""
    mask = batch["attention_mask"]
    positions = position_ids(mask)
    new = torch.full((mask.shape[0], max_new_tokens), int(lm.tokenizer.pad_token_id), dtype=torch.long,
                     device=mask.device)
    alive = torch.arange(mask.shape[0], device=mask.device)
    output = lm.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                      cache=DynamicCache(config=lm.model.config), use_cache=True, logits_to_keep=LAST_POSITION)
    for step in range(max_new_tokens):
        token = output.logits[:, -1, :].to(dtype=torch.float32).argmax(-1)
        new[alive, step] = token
        going = ~torch.isin(token, stop_ids)
        if step == max_new_tokens - 1 or not going.any():
            return new[:, :step + 1]
        if not going.all():
            keep = going.nonzero()[:, 0]
            alive, token, mask, positions = alive[keep], token[keep], mask[keep], positions[keep]
            output.cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        output = lm.model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=output.cache,
                          use_cache=True, logits_to_keep=LAST_POSITION)
    return new[:, :0]
