"""From prompts to model inputs: checks, the family's chat template, left-padded batches, padding-aware
position ids, one forward pass, and forward passes that continue a shared prompt prefix from its KV cache."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from lib.models import LoadedModel

# ``logits_to_keep`` for the last position only. transformers slices an int ``k`` as ``hidden[:, -k:, :]``, a strided
# view that ``torch.matmul`` does not fold into one product: after a prompt, the output layer would run as one
# vector-by-matrix product per row, far slower on a CPU than one matrix product. An index tensor gathers a contiguous
# copy first, so it is one matrix product (same logits up to float rounding; a decode step, one position long, is
# the same either way).
LAST_POSITION = torch.tensor([-1])


def check_prompts(prompts) -> None:
    """Raise a clear error unless ``prompts`` is a non-empty sequence of strings (a bare string would otherwise be
    read character by character)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt].")
    if not prompts:
        raise ValueError("The prompt list is empty; pass at least one prompt.")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] is {type(prompt).__name__} {prompt!r}, not a string; pass text only.")


def formatted(lm: LoadedModel, prompts: Sequence[str]) -> list[str]:
    """``prompts`` (checked) in the family's template: the text the tokenizer sees."""
    check_prompts(prompts)
    return [lm.info.template.format(lm.tokenizer, p) for p in prompts]


def context_length(lm: LoadedModel) -> int | None:
    """The longest input the model was built for (``max_position_embeddings``), when its config says."""
    return getattr(lm.model.config, "max_position_embeddings", None)


def warn_if_too_long(lm: LoadedModel, lengths: Sequence[int]) -> None:
    """Warn when a formatted prompt leaves no room in the model's context (its results would be meaningless)."""
    limit = context_length(lm)
    long = [i for i, n in enumerate(lengths) if limit is not None and n >= limit]
    if long:
        warnings.warn(f"{len(long)} prompt(s) (first: index {long[0]}, {lengths[long[0]]} tokens with the template) "
                      f"fill {lm.info.family}'s context of {limit} tokens; shorten them.", stacklevel=3)


def encode(lm: LoadedModel, prompts: list[str], device: torch.device | None = None):
    """Format ``prompts`` with the family's template and tokenise them as one left-padded batch."""
    texts = formatted(lm, prompts)
    batch = lm.tokenizer(texts, return_tensors="pt", padding=True,
                         add_special_tokens=lm.info.template.add_special_tokens)
    warn_if_too_long(lm, batch["attention_mask"].sum(1).tolist())
    return batch.to(device or input_device(lm.model))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (as generate() does), so that a left-padded
    forward pass gives every prompt the positions it would have alone, for absolute-position models too."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(lm: LoadedModel, batch, **kwargs):
    """One forward pass over an encoded batch with padding-aware position ids and no KV cache."""
    return lm.model(**batch, position_ids=position_ids(batch["attention_mask"]), use_cache=False, **kwargs)


def split_common_prefix(lm: LoadedModel, prompts: list[str]) -> tuple[list[int], list[list[int]]]:
    """Tokenise the formatted ``prompts`` and split off the token ids they all start with (the template's system
    turn, for most chat families): ``(prefix, suffixes)``, each suffix at least one token long. Splitting ids, not
    text, so ``prefix + suffix`` is exactly the tokenisation of the whole prompt."""
    ids = lm.tokenizer(formatted(lm, prompts), add_special_tokens=lm.info.template.add_special_tokens)["input_ids"]
    warn_if_too_long(lm, [len(row) for row in ids])
    shortest = min(len(row) for row in ids)
    length = 0
    while length < shortest - 1 and all(row[length] == ids[0][length] for row in ids):
        length += 1
    return list(ids[0][:length]), [list(row[length:]) for row in ids]


def prefix_cache(lm: LoadedModel, prefix: list[int]):
    """The KV cache of one pass over the shared ``prefix`` (under whatever hooks or weight edits are active)."""
    device = input_device(lm.model)
    ids = torch.tensor([prefix], device=device)
    return lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(
        len(prefix), device=device)[None], use_cache=True, logits_to_keep=LAST_POSITION).cache


def forward_after_prefix(lm: LoadedModel, cache, prefix_length: int, suffixes: list[list[int]], **kwargs):
    """One forward pass over left-padded ``suffixes`` that continue the cached prefix (``prefix_cache``), each row
    with the positions and attention it would have in the whole prompt. The cache is copied, not extended."""
    device = input_device(lm.model)
    padded = lm.tokenizer.pad({"input_ids": suffixes}, padding=True, return_tensors="pt").to(device)  # left
    ids, suffix_mask = padded["input_ids"], padded["attention_mask"]
    rows = copy.deepcopy(cache)
    rows.batch_repeat_interleave(len(suffixes))
    mask = torch.cat([torch.ones(len(suffixes), prefix_length, dtype=suffix_mask.dtype, device=device), suffix_mask],
                     dim=1)
    return lm.model(input_ids=ids, attention_mask=mask, position_ids=prefix_length + position_ids(suffix_mask),
                    cache=rows, use_cache=True, **kwargs)


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go (the embedding's device, also under accelerate's multi-GPU dispatch)."""
    return model.get_input_embeddings().weight.device
