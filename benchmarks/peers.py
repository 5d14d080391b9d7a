"""The peer `make bench` compares lib's ablated generation with: TransformerLens (the paper's tool).

It comes from the optional extra ``bench`` (``pip install -e .[bench]``), which ``make bench`` installs into its
own ``.venv-bench`` so that ``.venv`` keeps exactly the book's pins. ``TransformerLensPeer`` raises
``PeerUnavailable`` with the peer's own error text when it cannot load the model; the benchmark then reports that
text and keeps the other comparisons.

TransformerLens 4.3.0's ``TransformerBridge`` reads the KV cache from the keyword ``past_key_values``, which
transformers 5.24 passes as ``cache``: the cache is never extended and greedy output degenerates after one token.
``patch_kv_cache`` forwards ``cache`` under the old name; then its greedy tokens equal ``generate``'s.
"""

from __future__ import annotations

import contextlib
import copy
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from lib.hooks import check_layers


class PeerUnavailable(RuntimeError):
    """The peer library is missing or cannot load or run this model."""


def patch_kv_cache() -> bool:
    """Make TransformerBridge's attention find transformers 5.24's ``cache`` keyword (see the module docstring)."""
    # lazy: transformer-lens is the optional `bench` extra, absent from the book's .venv
    from transformer_lens.model_bridge.generalized_components import attention

    original = attention.AttentionBridge._update_kv_cache
    if getattr(original, "patched_for_cache_keyword", False):
        return True

    def _update_kv_cache(self, k, v, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None \
                and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return original(self, k, v, **kwargs)

    _update_kv_cache.patched_for_cache_keyword = True
    attention.AttentionBridge._update_kv_cache = _update_kv_cache
    return True


class TransformerLensPeer:
    """A TransformerLens ``TransformerBridge`` around its own copy of the HF model (TransformerLens forces eager
    attention on the model it wraps, which must not slow down the lib runs on the original)."""

    name = "TransformerLens"

    def __init__(self, lm):
        try:
            # lazy: transformer-lens is the optional `bench` extra, absent from the book's .venv
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError as error:
            raise PeerUnavailable(f"transformer-lens is not installed ({error}); run `make bench`, which installs "
                                  "the `bench` extra into .venv-bench.") from error
        self.lm = lm
        self.patched = patch_kv_cache()
        model = copy.deepcopy(lm.model)
        source = getattr(model.config, "_name_or_path", "") or "custom"
        try:
            self.bridge = TransformerBridge.boot_transformers(source, hf_model=model, tokenizer=lm.tokenizer,
                                                              device=str(lm.info.device), dtype=lm.info.dtype)
        except Exception as error:  # noqa: BLE001 - the peer's own message is the finding
            raise PeerUnavailable(f"TransformerBridge.boot_transformers failed: {type(error).__name__}: "
                                  f"{error}") from error
        self.bridge.eval()
        try:
            self.version = version("transformer-lens")
        except PackageNotFoundError:
            self.version = None

    def ablation_hooks(self, basis: torch.Tensor) -> list[tuple[str, Any]]:
        """The paper's hooks: project ``basis`` out of resid_pre, resid_mid and resid_post of every layer."""
        def ablate(activation, hook):
            b = basis.to(activation.device, activation.dtype)
            return activation - (activation @ b.T) @ b

        return [(f"blocks.{layer}.hook_resid_{site}", ablate)
                for layer in check_layers(self.lm.info, None) for site in ("pre", "mid", "post")]

    def generate(self, batch, max_new_tokens: int, basis: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy new tokens [batch, max_new_tokens] from a left-padded batch, with the ablation hooks if given."""
        hooks = self.ablation_hooks(basis) if basis is not None else []
        hooked = self.bridge.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext()
        with torch.inference_mode(), hooked:
            out = self.bridge.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                       max_new_tokens=max_new_tokens, do_sample=False, stop_at_eos=False,
                                       use_past_kv_cache=True, return_type="tokens", verbose=False)
        return out[:, batch["input_ids"].shape[1]:]
