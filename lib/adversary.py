"""The adversary: the paper's untargeted PGD perturbation of the residual stream (Casper et al. 2024), its strength
at a radius, and the organisms chapter's robustness check (a fresh attack on the prompt, then generation under it).

The perturbation lives at ``resid_pre`` of one layer (layer 0: the token embeddings, AT's site; the LAT layer:
LAT's) over the whole [sequence x d_model] tensor of each example, inside an L2 ball of radius epsilon: random start
(Gaussian rescaled to radius U(0, 1) * epsilon), then PGD steps of size epsilon / steps along the per-example
L2-normalised gradient that increases the loss, projected back into the ball after each step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lib.artifacts import artifact_path, cache_key, cached_json, sha256_text
from lib.generation import complete_batch
from lib.hooks import attached, site_hook
from lib.inputs import encode
from lib.losses import IGNORE, lm_loss, response_loss
from lib.models import LoadedModel
from lib.packed import packed_products


def per_example_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each example's whole tensor (all but the first axis), shaped to broadcast against ``x``."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))


def perturbation_hook(lm: LoadedModel, layer: int, delta_ref: dict):
    """A hook adding ``delta_ref["delta"]`` to the residual stream entering ``layer`` (read at call time)."""
    return site_hook(lm.info, "resid_pre", layer, lambda hidden: hidden + delta_ref["delta"].to(hidden.dtype))


def pgd_attack(lm: LoadedModel, batch: dict[str, torch.Tensor], layer: int, epsilon: float, steps: int = 6,
               generator: torch.Generator | None = None, perturb_mask: torch.Tensor | None = None,
               loss_fn=None) -> torch.Tensor:
    """The paper's untargeted adversary at resid_pre of ``layer``: a perturbation [batch, seq, d] with per-example
    L2 norm <= epsilon that increases the LM loss on ``batch``'s labels. Only positions where ``perturb_mask``
    (default: the attention mask, i.e. every real token) is 1 are perturbed. ``loss_fn`` (default ``lm_loss``,
    what the shipped adapters were trained with) computes that loss; ``response_loss`` is the same loss, faster."""
    loss_fn = loss_fn or lm_loss
    shape = (*batch["input_ids"].shape, lm.info.d_model)
    device = batch["input_ids"].device
    mask = (batch["attention_mask"] if perturb_mask is None else perturb_mask).unsqueeze(-1).float().to(device)
    noise = torch.randn(shape, generator=generator).to(device) * mask
    radius = torch.rand(shape[0], generator=generator).to(device).view(-1, 1, 1) * epsilon
    delta = noise / per_example_norm(noise).clamp_min(1e-12) * radius
    ref = {"delta": delta}
    with attached([perturbation_hook(lm, layer, ref)]):
        for _ in range(steps):
            delta.requires_grad_(True)
            ref["delta"] = delta
            grad, = torch.autograd.grad(loss_fn(lm, batch), delta)
            grad = grad * mask
            with torch.no_grad():
                delta = delta + (epsilon / steps) * grad / per_example_norm(grad).clamp_min(1e-12)
                delta = delta * (epsilon / per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta.detach()


def loss_under_attack(lm: LoadedModel, batch: dict[str, torch.Tensor], layer: int, epsilon: float,
                      steps: int = 6, seed: int = 0) -> tuple[float, float]:
    """(clean loss, loss under a fresh PGD perturbation) on ``batch``: the adversary's strength at ``epsilon``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clean = float(lm_loss(lm, batch))
    delta = pgd_attack(lm, batch, layer, epsilon, steps, generator)
    with torch.no_grad(), attached([perturbation_hook(lm, layer, {"delta": delta})]):
        attacked = float(lm_loss(lm, batch))
    return clean, attacked


def residual_norms(lm: LoadedModel, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """Per-example L2 norm of the whole [seq x d] residual tensor entering ``layer`` (padding excluded): the
    scale against which an adversary's radius is judged."""
    captured = {}

    def keep(hidden):
        captured["h"] = hidden.detach()

    with torch.no_grad(), attached([site_hook(lm.info, "resid_pre", layer, keep)]):
        lm_loss(lm, batch)
    masked = captured["h"].float() * batch["attention_mask"].unsqueeze(-1)
    return per_example_norm(masked).flatten()


def _attack_batch(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str]) -> tuple[dict, int]:
    """Left-padded prompts followed by right-padded targets; labels on the targets only. Returns (batch, P)."""
    prompt_batch = encode(lm, list(prompts), device=torch.device("cpu"))
    width = prompt_batch["input_ids"].shape[1]
    target_ids = [lm.tokenizer(t, add_special_tokens=False).input_ids for t in targets]
    t_width = max(len(t) for t in target_ids)
    pad = lm.tokenizer.pad_token_id
    ids = torch.cat([prompt_batch["input_ids"], torch.tensor([t + [pad] * (t_width - len(t)) for t in target_ids])], 1)
    mask = torch.cat([prompt_batch["attention_mask"],
                      torch.tensor([[1] * len(t) + [0] * (t_width - len(t)) for t in target_ids])], 1)
    labels = ids.clone()
    labels[:, :width] = IGNORE
    labels[mask == 0] = IGNORE
    device = lm.info.device
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}, width


@dataclass(frozen=True)
class Attack:
    """A fresh PGD attack on the prompt's residual stream entering ``layer``: its L2 radius per prompt
    (``epsilon``), its number of steps, and how many tokens are generated under it."""

    layer: int
    epsilon: float
    steps: int = 6
    max_new_tokens: int = 24


def attacked_completions(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str], attack: Attack,
                         batch_size: int = 16, seed: int = 0) -> list[str]:
    """Greedy completions under a fresh untargeted PGD perturbation of the PROMPT's residual stream entering
    ``attack.layer`` (L2 <= ``attack.epsilon`` per prompt): the perturbation maximises the loss of ``targets``
    (refusals) given the prompt, and is then added at every prompt position while the answer is generated. The
    attack's loss is ``response_loss`` (logits at the target positions only). On a float32 CPU model the attack's
    products use weights packed once per batch for oneDNN (``lib.packed.packed_products(..., gradients=True)``), so
    that the forward and backward passes of every PGD step do not re-pack each weight on every call."""
    layer = attack.layer
    completions: list[str] = []
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        batch, width = _attack_batch(lm, chunk, targets[start:start + batch_size])
        prompt_mask = batch["attention_mask"].clone()
        prompt_mask[:, width:] = 0
        with packed_products(lm.model, "attack", gradients=True):
            delta = pgd_attack(lm, batch, layer, attack.epsilon, attack.steps, generator, prompt_mask,
                               response_loss)[:, :width]
        ref = {"delta": delta}

        def add_on_prefill(hidden):
            return hidden + ref["delta"].to(hidden.dtype) if hidden.shape[1] == width else None

        with attached([site_hook(lm.info, "resid_pre", layer, add_on_prefill)]):
            completions += complete_batch(lm, encode(lm, chunk), attack.max_new_tokens)
    return completions


def cached_attack(lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str], attack: Attack, seed: int = 0,
                  batch_size: int = 32) -> list[str]:
    """``attacked_completions``, cached as a JSON artifact keyed by the model, the prompts and every setting."""
    key = cache_key(model=lm.info.fingerprint, prompts=sha256_text(json.dumps(list(prompts))),
                    targets=sha256_text(json.dumps(list(targets))), layer=attack.layer, epsilon=attack.epsilon,
                    steps=attack.steps, max_new_tokens=attack.max_new_tokens, seed=seed, dtype=str(lm.info.dtype))
    path = artifact_path("attacks", lm.info.family, lm.info.variant, f"layer{attack.layer}-{key}.json")
    return cached_json(path, key, lambda: attacked_completions(lm, prompts, targets, attack, batch_size, seed))

