"""Where hooks sit, and a context manager that always removes them.

Site names follow TransformerLens: ``resid_pre`` (the residual stream entering block L), ``resid_mid`` (after
block L's attention has been added) and ``resid_post`` (leaving block L). Transformers 5 decoder layers may return a
tensor or a tuple whose first element is the hidden state; both are handled here and nowhere else.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from lib.models import ModelInfo


SITES = ("resid_pre", "resid_mid", "resid_post")
# Where directional ablation acts (and where its mean-ablation targets are measured): the block input and the two
# outputs a block adds to the residual stream (TransformerLens: hook_resid_pre, hook_attn_out, hook_mlp_out).
WRITE_SITES = ("resid_pre", "attn_out", "mlp_out")

# A hook function receives the hidden state [batch, seq, d] and returns a replacement (or None to keep it).
HiddenFn = Callable[[torch.Tensor], torch.Tensor | None]


def _is_index(value) -> bool:
    """True for a whole number usable as an index (int, numpy or 0-d integer tensor); False for 1.7, "1", True."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_layers(info: ModelInfo, layers: Sequence[int] | None) -> list[int]:
    """Validate layer indices (default: all layers) against the model's depth."""
    if layers is not None and not all(_is_index(layer) for layer in layers):
        raise ValueError(f"Layers must be whole numbers, got {list(layers)!r}; pass e.g. [1, 2] (a layer index, "
                         "not a fraction of the depth).")
    chosen = list(range(info.n_layers)) if layers is None else [int(layer) for layer in layers]
    if not chosen:
        raise ValueError("The list of layers is empty; pass at least one layer index (or None for all).")
    bad = [layer for layer in chosen if not 0 <= layer < info.n_layers]
    if bad:
        raise ValueError(f"Layer(s) {bad} out of range: {info.family}/{info.variant} has layers 0..{info.n_layers - 1}.")
    return chosen


def check_sites(sites: Sequence[str]) -> list[str]:
    if isinstance(sites, str):
        raise ValueError(f"sites must be a list of site names, not one string; wrap it: [{sites!r}].")
    unknown = [site for site in sites if site not in SITES]
    if unknown or not sites:
        raise ValueError(f"Unknown residual site(s) {unknown or list(sites)}; choose from {SITES}.")
    return list(sites)


def first_tensor(value):
    """The hidden state inside a module output that is a tensor or a tuple starting with one."""
    return value[0] if isinstance(value, tuple) else value


def replace_first(value, tensor: torch.Tensor):
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor


def input_hook(fn: HiddenFn):
    """A forward pre-hook (with kwargs) that passes the module's hidden-state input through ``fn``."""

    def hook(module, args, kwargs):
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def output_hook(fn: HiddenFn):
    """A forward hook that passes the module's (first) output through ``fn``."""

    def hook(module, args, output):
        new = fn(first_tensor(output))
        return None if new is None else replace_first(output, new)

    return hook


def site_hook(info: ModelInfo, site: str, layer: int, fn: HiddenFn) -> tuple[nn.Module, str, Callable]:
    """(module, "pre" or "post", hook) that exposes the residual stream at ``site`` of ``layer`` to ``fn``."""
    block = info.layers[layer]
    if site == "resid_pre":
        return block, "pre", input_hook(fn)
    if site == "resid_mid":
        return info.submodule(layer, "mid"), "pre", input_hook(fn)
    if site == "resid_post":
        return block, "post", output_hook(fn)
    raise ValueError(f"Unknown residual site {site!r}; choose from {SITES}.")


def write_site_hook(info: ModelInfo, site: str, layer: int, fn: HiddenFn) -> tuple[nn.Module, str, Callable]:
    """(module, "pre" or "post", hook) that passes ``site`` of ``layer`` (one of ``WRITE_SITES``) through ``fn``."""
    if site == "resid_pre":
        return info.layers[layer], "pre", input_hook(fn)
    if site in ("attn_out", "mlp_out"):
        return info.submodule(layer, site.removesuffix("_out")), "post", output_hook(fn)
    raise ValueError(f"Unknown write site {site!r}; choose from {WRITE_SITES}.")


@contextlib.contextmanager
def attached(hooks: Sequence[tuple[nn.Module, str, Callable]]) -> Iterator[None]:
    """Register forward ("post") and forward-pre ("pre") hooks for the duration of the block; always remove them."""
    handles = []
    try:
        for module, kind, hook in hooks:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            elif kind == "post":
                handles.append(module.register_forward_hook(hook))
            else:
                raise ValueError(f"Hook kind must be 'pre' or 'post', not {kind!r}.")
        yield
    finally:
        for handle in handles:
            handle.remove()
