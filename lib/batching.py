"""Batch sizes from free memory.

``auto_batch_size(lm, max_prompt_tokens, max_new_tokens, device)`` estimates what one sequence needs from the model's
shapes (KV cache over prompt + new tokens, the prefill's activations and attention scores, the logits) and divides
the memory free now (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` in /proc/meminfo, else
``os.sysconf``) by it, keeping a margin. The result is rounded down to a power of two, so that a small change in
free memory does not change how prompts are grouped (batch composition changes padding, and with it the last bits
of CPU results), and capped: on a CPU, throughput stops improving long before memory runs out.
"""

from __future__ import annotations

import math
import os

import torch


CPU_CAP = 32  # on a CPU, 32 prompts per batch already saturate the matmuls (lib.generation's default)
CUDA_CAP = 512
CPU_FRACTION = 0.5  # CPU RAM is shared with the rest of the machine (notebooks, a second process)
CUDA_FRACTION = 0.85  # leave room for the CUDA context, fragmentation and cuBLAS workspaces
SAFETY = 1.25  # allocator slack and temporaries the estimate does not itemise


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free for new tensors on ``device`` now: CUDA ``mem_get_info`` plus what PyTorch's caching allocator
    holds but no tensor uses (a large earlier batch leaves it reserved, which ``mem_get_info`` counts as taken:
    without it the batch after a big run would come out far smaller than the first); CPU ``MemAvailable`` from
    /proc/meminfo (Linux), else free physical pages from ``os.sysconf``."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _shapes(model) -> dict[str, int]:
    config = model.config
    config = getattr(config, "text_config", None) or config
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    return {"layers": config.num_hidden_layers, "d": d_model, "heads": n_heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or n_heads,
            "head_dim": getattr(config, "head_dim", None) or d_model // n_heads,
            "ffn": getattr(config, "intermediate_size", None) or 4 * d_model, "vocab": config.vocab_size}


def sequence_bytes(lm, max_prompt_tokens: int, max_new_tokens: int, kv_cache: bool = True) -> int:
    """Estimated peak bytes one sequence adds (weights excluded), before the safety margin.

    With ``kv_cache`` (``generate``): the cache over prompt + new tokens, the prefill's activations over the prompt
    (residual, attention and MLP temporaries, eager attention scores) and float32 next-token logits.
    ``max_new_tokens=0`` is a plain forward pass (capture), which computes logits at every prompt position.
    Without ``kv_cache`` (the paper's recompute loop): each step is a full forward over prompt + new tokens.
    """
    if max_prompt_tokens < 1 or max_new_tokens < 0:
        raise ValueError(f"max_prompt_tokens ({max_prompt_tokens}) must be >= 1 and max_new_tokens "
                         f"({max_new_tokens}) >= 0.")
    s = _shapes(lm.model)
    size = torch.finfo(lm.info.dtype).bits // 8 if lm.info.dtype.is_floating_point else 4
    total = max_prompt_tokens + max_new_tokens
    forward_tokens = max_prompt_tokens if kv_cache else total
    activations = forward_tokens * (6 * s["d"] + 3 * s["ffn"]) * size
    scores = 2 * s["heads"] * forward_tokens * forward_tokens * size  # scores + softmax (eager worst case)
    if max_new_tokens == 0 or not kv_cache:
        logits = forward_tokens * s["vocab"] * max(size, 4)  # every position's logits (upcast when sliced)
    else:
        logits = 2 * s["vocab"] * 4  # generate keeps only the next-token logits, in float32
    cache = 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * total * size if kv_cache and max_new_tokens else 0
    return int(activations + scores + logits + cache)


def auto_batch_size(lm, max_prompt_tokens: int, max_new_tokens: int, device: str | torch.device | None = None, *,
                    available_bytes: int | None = None, fraction: float | None = None, cap: int | None = None,
                    kv_cache: bool = True) -> int:
    """The largest power-of-two batch whose estimated memory fits ``fraction`` of the free memory on ``device``
    (default: the model's device), capped at ``cap`` (CPU 32, CUDA 512); at least 1.

    ``available_bytes`` overrides the measurement (tests, or a budget of your own)."""
    device = torch.device(device) if device is not None else lm.info.device
    if available_bytes is None:
        available_bytes = available_memory(device)
    if fraction is None:
        fraction = CUDA_FRACTION if device.type == "cuda" else CPU_FRACTION
    if cap is None:
        cap = CUDA_CAP if device.type == "cuda" else CPU_CAP
    if not 0 < fraction <= 1 or cap < 1:
        raise ValueError(f"fraction must be in (0, 1] and cap >= 1; got fraction={fraction}, cap={cap}.")
    per_sequence = SAFETY * sequence_bytes(lm, max_prompt_tokens, max_new_tokens, kv_cache)
    fits = int(available_bytes * fraction // per_sequence)
    if fits < 1:
        return 1
    return min(cap, 1 << int(math.log2(fits)))


def balanced(n_items: int, batch_size: int) -> int:
    """The smallest batch size that needs as few batches as ``batch_size`` does for ``n_items`` (520 prompts at
    512 -> 260, two equal batches instead of 512 + 8)."""
    if n_items < 1 or batch_size < 1:
        raise ValueError(f"n_items ({n_items}) and batch_size ({batch_size}) must be >= 1.")
    n_batches = math.ceil(n_items / batch_size)
    return math.ceil(n_items / n_batches)
