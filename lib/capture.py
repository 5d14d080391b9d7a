"""Residual-stream capture: activations at chosen sites, layers and prompt positions, for many prompts.

Only the requested positions are kept (memory O(n x layers x d), not O(n x tokens x layers x d)), accumulated in
float32 on the CPU, and the forward pass stops right after the deepest requested layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

import lib
from lib.artifacts import artifact_path, cache_key, cached_tensors, sha256_text
from lib.batching import auto_batch_size
from lib.data import pairs_sha256
from lib.hooks import SITES, WRITE_SITES, attached, check_layers, check_sites, site_hook, write_site_hook
from lib.inputs import LAST_POSITION, check_prompts, encode, forward
from lib.models import LoadedModel, for_each_model
from lib.packed import packed_products
from lib.progress import progress


DEFAULT_BATCH_SIZE = 16


class _StopForward(Exception):
    """Raised by the last capture hook: nothing after the deepest requested layer needs computing."""


def _position_index(attention_mask: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """Absolute token indices [batch, P] for prompt-relative positions (-1 = last prompt token, 0 = first)."""
    seq_len = attention_mask.shape[1]
    lengths = attention_mask.sum(dim=1)
    index = []
    for position in positions:
        too_far = (position >= lengths) | (position < -lengths)
        if bool(too_far.any()):
            raise ValueError(f"Position {position} is outside a prompt of {int(lengths.min())} tokens; use "
                             "-1 for the last prompt token or a smaller offset.")
        index.append(seq_len + position if position < 0 else seq_len - lengths + position)
    return torch.stack([torch.as_tensor(i).expand(len(lengths)) for i in index], dim=1)


def prompt_lengths(lm: LoadedModel, prompts: Sequence[str]) -> list[int]:
    """Tokenised length of each prompt as the model sees it (template and special tokens included)."""
    return [len(lm.tokenizer(lm.info.template.format(lm.tokenizer, p),
                             add_special_tokens=lm.info.template.add_special_tokens).input_ids) for p in prompts]


def order_by_length(lm: LoadedModel, prompts: Sequence[str]) -> list[int]:
    """Prompt indices sorted by tokenised length (stable), so that batches carry little padding."""
    lengths = prompt_lengths(lm, prompts)
    return sorted(range(len(prompts)), key=lambda i: lengths[i])


def collect(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int] | None = None,
            sites: Sequence[str] = ("resid_pre",), positions: int | Sequence[int] = -1,
            batch_size: int | None = DEFAULT_BATCH_SIZE, desc: str = "capture") -> dict[str, torch.Tensor]:
    """Residual activations for ``prompts`` (formatted with the family's template), one tensor per site.

    Returns ``{site: [n, len(layers), d]}`` for a single position (default: the last prompt token), or
    ``[n, len(layers), len(positions), d]`` for a list of positions; float32 on the CPU, rows in prompt order.
    ``batch_size=None`` picks one that fits the free memory (``lib.batching.auto_batch_size``).
    """
    check_prompts(prompts)
    if batch_size is None:
        batch_size = auto_batch_size(lm, max(prompt_lengths(lm, prompts)), 0)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    layers = check_layers(lm.info, layers)
    sites = check_sites(sites)
    single = isinstance(positions, int)
    position_list = [positions] if single else list(positions)
    if not position_list:
        raise ValueError("The list of positions is empty; pass -1 for the last prompt token.")
    n, d = len(prompts), lm.info.d_model
    out = {site: torch.zeros(n, len(layers), len(position_list), d, dtype=torch.float32) for site in sites}
    layer_slot = {layer: slot for slot, layer in enumerate(layers)}
    deepest = max(layers)
    last_site = max(sites, key=lambda s: ("resid_pre", "resid_mid", "resid_post").index(s))
    state: dict[str, torch.Tensor] = {}

    def capture_fn(site: str, layer: int):
        def fn(hidden: torch.Tensor):
            index = state["index"].to(hidden.device)
            rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
            out[site][state["rows"], layer_slot[layer]] = hidden[rows, index].float().cpu()
            if layer == deepest and site == last_site:
                raise _StopForward
            return None
        return fn

    hooks = [site_hook(lm.info, site, layer, capture_fn(site, layer)) for site in sites for layer in layers]
    order = order_by_length(lm, prompts)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    with torch.inference_mode(), packed_products(lm.model, "measurement"), attached(hooks):
        for batch_rows in progress(batches, desc=desc):
            batch = encode(lm, [prompts[i] for i in batch_rows])
            state["rows"] = torch.tensor(batch_rows)
            state["index"] = _position_index(batch["attention_mask"].cpu(), position_list)
            try:
                forward(lm, batch)
            except _StopForward:
                pass
    return {site: (acts[:, :, 0] if single else acts) for site, acts in out.items()}


POSITION_SETS = ("last", "rest")


def site_statistics(lm: LoadedModel, prompts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
                    positions: str = "last", desc: str = "site statistics") -> dict[str, torch.Tensor]:
    """Statistics of the residual stream at every ``WRITE_SITES`` site (block input, attention output, MLP output)
    of every layer: ``{"mean", "mean_square", "first"}``, each ``[n_layers, 3, d]`` float32.

    ``mean`` and ``mean_square`` average over ``positions``: ``"last"``, each prompt's last token (where refusal
    directions are measured, and what ``lib.ablation``'s mean ablation keeps), or ``"rest"``, every token but the
    first (padding excluded). The first token is the same start token in every prompt, and in many models it carries
    massive activations hundreds of times larger than elsewhere (SmolLM2: ~25,000 on one coordinate); ``first`` is
    its value, averaged over prompts. Cached as an artifact keyed by the model, the prompts, the positions, the
    template, the dtype and lib's code."""
    if not prompts:
        raise ValueError("The prompt list is empty; pass at least one prompt.")
    if positions not in POSITION_SETS:
        raise ValueError(f"Unknown position set {positions!r}; choose from {POSITION_SETS}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")

    info = lm.info
    metadata = {"family": info.family, "variant": info.variant, "model_fingerprint": info.fingerprint,
                "prompts_sha256": sha256_text("\0".join(prompts)), "n_prompts": len(prompts),
                "positions": positions, "template": info.template.template,
                "add_special_tokens": info.template.add_special_tokens, "dtype": str(info.dtype)}
    key = cache_key(kind="site_statistics", **metadata)
    path = artifact_path("site-statistics", info.family, info.variant, f"{key}.safetensors")
    tensors, _ = cached_tensors(path, key, {**metadata, "lib_version": lib.__version__},
                                lambda: _site_statistics(lm, prompts, batch_size, positions, desc))
    return tensors


def _site_statistics(lm: LoadedModel, prompts: Sequence[str], batch_size: int, positions: str,
                     desc: str) -> dict[str, torch.Tensor]:
    shape = (lm.info.n_layers, len(WRITE_SITES), lm.info.d_model)
    sums = {name: torch.zeros(shape, dtype=torch.float64) for name in ("mean", "mean_square", "first")}
    state: dict[str, torch.Tensor] = {}

    def accumulate(layer: int, slot: int):
        def fn(hidden: torch.Tensor):
            values = hidden.detach().double().cpu()
            rest, first = state["rest"].unsqueeze(-1), state["first"].unsqueeze(-1)
            sums["mean"][layer, slot] += (values * rest).sum((0, 1))
            sums["mean_square"][layer, slot] += (values.square() * rest).sum((0, 1))
            sums["first"][layer, slot] += (values * first).sum((0, 1))
            return None
        return fn

    hooks = [write_site_hook(lm.info, site, layer, accumulate(layer, slot))
             for layer in range(lm.info.n_layers) for slot, site in enumerate(WRITE_SITES)]
    order = order_by_length(lm, prompts)
    n_rest = 0
    with torch.inference_mode(), packed_products(lm.model, "measurement"), attached(hooks):
        for start in progress(range(0, len(prompts), batch_size), desc=desc):
            batch = encode(lm, [prompts[i] for i in order[start:start + batch_size]])
            mask = batch["attention_mask"].cpu().double()
            seen = mask.cumsum(1) * mask
            state["first"] = (seen == 1).double()
            state["rest"] = (seen > 1).double() if positions == "rest" else torch.zeros_like(mask).index_fill_(
                1, torch.tensor([mask.shape[1] - 1]), 1.0)  # left padding: the last column is every last token
            n_rest += int(state["rest"].sum())
            forward(lm, batch, logits_to_keep=LAST_POSITION)
    if n_rest == 0:
        raise ValueError("Every prompt is a single token long: there are no positions after the first to average; "
                         "use positions='last'.")
    return {"mean": (sums["mean"] / n_rest).float(), "mean_square": (sums["mean_square"] / n_rest).float(),
            "first": (sums["first"] / len(prompts)).float()}


def pair_activations(lm: LoadedModel, pairs: Sequence, dataset: str = "offline",
                     layers: Sequence[int] | None = None, sites: Sequence[str] = SITES, position: int = -1,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[dict[str, torch.Tensor], dict]:
    """Harmful and harmless activations ``{"harmful/resid_pre": [n, layers, d], ...}`` for prompt pairs, cached
    as an artifact keyed by everything that determines them (model and adapters, data, template, position,
    dtype, layers, sites, lib version). Returns the tensors and the artifact's metadata."""
    if not pairs:
        raise ValueError("The list of prompt pairs is empty.")
    layers = check_layers(lm.info, layers)
    sites = check_sites(sites)
    info = lm.info
    metadata = {"family": info.family, "variant": info.variant, "model_fingerprint": info.fingerprint,
                "dataset": dataset, "data_sha256": pairs_sha256(list(pairs)), "n_pairs": len(pairs),
                "pair_ids": [p.id for p in pairs], "template": info.template.template,
                "add_special_tokens": info.template.add_special_tokens, "position": position,
                "dtype": str(info.dtype), "layers": layers, "sites": sites}
    key = cache_key(**{k: v for k, v in metadata.items() if k != "pair_ids"})

    def compute() -> dict[str, torch.Tensor]:
        tensors = {}
        for kind in ("harmful", "harmless"):
            texts = [getattr(p, kind) for p in pairs]
            acts = collect(lm, texts, layers, sites, position, batch_size, desc=f"{info.variant} {kind}")
            tensors.update({f"{kind}/{site}": value for site, value in acts.items()})
        return tensors

    path = artifact_path("activations", info.family, info.variant, f"{dataset}-pairs.safetensors")
    return cached_tensors(path, key, {**metadata, "lib_version": lib.__version__}, compute)


def norms_frame(tensors: dict[str, torch.Tensor], variant: str, site: str = "resid_pre",
                layers: Sequence[int] | None = None):
    """Mean L2 norm per layer of harmful and harmless activations: a DataFrame (variant, layer, split, mean_norm)."""
    rows = []
    for split in ("harmful", "harmless"):
        acts = tensors[f"{split}/{site}"]
        labels = list(range(acts.shape[1])) if layers is None else list(layers)
        for slot, norm in enumerate(acts.norm(dim=-1).mean(0).tolist()):
            rows.append({"variant": variant, "layer": labels[slot], "split": split, "mean_norm": norm})
    return pd.DataFrame(rows)


def variant_activations(family: str, variants: Sequence[str], pairs: Sequence, dataset: str = "offline",
                        site: str = "resid_pre", batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto",
                        dtype: str = "auto") -> dict[str, dict]:
    """The activation-collection chapter's artifacts for several variants (each computed if absent):
    ``{variant: {"harmful": [n, layers, d], "harmless": [n, layers, d], "fingerprint": str}}`` at ``site`` and the
    last prompt token, every layer. Each model is loaded only to check (or compute) its artifact."""
    def activations(lm: LoadedModel) -> dict:
        tensors, _ = pair_activations(lm, pairs, dataset, None, SITES, -1, batch_size)
        return {"harmful": tensors[f"harmful/{site}"], "harmless": tensors[f"harmless/{site}"],
                "fingerprint": lm.info.fingerprint, "n_layers": lm.info.n_layers}

    return for_each_model(family, variants, activations, device, dtype)
