"""Generation-free scores: the log-probability of the first answer token after each prompt, the refusal score
Arditi et al. use for layer sweeps (the log-odds that the answer opens with a refusal token), and the KL divergence
between two such distributions (how much an intervention moves a harmless prompt's first token)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lib.inputs import (LAST_POSITION, check_prompts, encode, forward, forward_after_prefix, prefix_cache,
                        split_common_prefix)
from lib.models import LoadedModel
from lib.packed import packed_products


def refusal_token_ids(lm: LoadedModel) -> list[int]:
    """First token ids of the family's typical refusal openings (e.g. "I" for Llama-2 chat)."""
    ids = []
    for word in lm.info.refusal_tokens:
        tokens = lm.tokenizer(word, add_special_tokens=False).input_ids
        if tokens and tokens[0] not in ids:
            ids.append(tokens[0])
    if not ids:
        raise ValueError(f"None of the refusal tokens {lm.info.refusal_tokens} tokenise to anything.")
    return ids


def next_token_log_probs(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Log-probabilities [n, vocab] (float64, CPU) of the first answer token after each formatted prompt, in prompt
    order; any hooks or weight edits active around the call apply.

    The token ids every prompt starts with (a chat template's system turn: 27 of SmolLM2's ~42 tokens) are run once,
    under the same hooks, and their KV cache is shared by every batch (``lib.inputs.split_common_prefix``); the
    rest is batched by length, so the shared tokens are computed once instead of in every row (see BENCHMARKS.md).
    The logits equal whole-prompt passes up to float rounding (tested). Under ``REFUSAL_BOOK_PACKED_LINEAR=all`` the
    products use weights packed for oneDNN (``lib.packed.packed_products``; not the default: printed digits move)."""
    check_prompts(prompts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    prefix, suffixes = split_common_prefix(lm, list(prompts))
    order = sorted(range(len(prompts)), key=lambda i: (len(suffixes[i]), i))  # less padding per batch
    parts = []
    with torch.inference_mode(), packed_products(lm.model, "measurement"):
        cache = prefix_cache(lm, prefix) if prefix else None
        for start in range(0, len(prompts), batch_size):
            batch = order[start:start + batch_size]
            if cache is None:
                output = forward(lm, encode(lm, [prompts[i] for i in batch]), logits_to_keep=LAST_POSITION)
            else:
                output = forward_after_prefix(lm, cache, len(prefix), [suffixes[i] for i in batch],
                                              logits_to_keep=LAST_POSITION)
            parts.append((batch, torch.log_softmax(output.logits[:, -1].double(), dim=-1).cpu()))
    rows = torch.empty(len(prompts), parts[0][1].shape[1], dtype=torch.float64)
    for batch, log_probs in parts:
        rows[batch] = log_probs
    return rows


def refusal_score_from(lm: LoadedModel, log_probs: torch.Tensor) -> torch.Tensor:
    """Refusal log-odds per row of ``next_token_log_probs`` output (see ``refusal_score``)."""
    ids = torch.tensor(refusal_token_ids(lm))
    log_p = torch.logsumexp(log_probs[:, ids], dim=-1)
    log_not_p = torch.log1p(-log_p.exp().clamp(max=1 - 1e-12))
    return (log_p - log_not_p).float()


def refusal_score(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Log-odds that the first generated token opens a refusal: log p / (1 - p), p = the summed probability of the
    refusal tokens (Arditi et al.'s cheap score for layer sweeps; no generation). One value per prompt."""
    return refusal_score_from(lm, next_token_log_probs(lm, prompts, batch_size))


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per row, for two [n, vocab] log-probability matrices. A token the reference never
    emits (probability 0, log-probability -inf) contributes nothing (0 log 0 = 0), not NaN."""
    probabilities = reference.exp()
    terms = torch.where(probabilities > 0, probabilities * (reference - other), torch.zeros_like(probabilities))
    return terms.sum(-1).float()

