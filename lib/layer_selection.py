"""Chapter 04's choice of the attack layer (Arditi et al. 2024): ablate each layer's candidate direction
everywhere, score refusal on harmful prompts and the first-token KL on harmless ones without generating, and take
the layer that lowers refusal most while the KL stays small and the layer is not too deep."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from lib.ablation import ablation_means, orthogonalized
from lib.config import Config
from lib.hooks import check_layers
from lib.models import LoadedModel, for_each_model
from lib.packed import packed_products
from lib.progress import progress
from lib.scores import kl_divergence, next_token_log_probs, refusal_score_from


@dataclass(frozen=True)
class LayerRule:
    """The settings of Arditi et al.'s layer rule (``select_layer``): the layer to fall back on, the sweep's stride,
    the largest harmless first-token KL allowed, and the deepest fraction of the depth considered."""

    fallback: int
    stride: int = 1
    max_kl: float = 0.1
    max_depth: float = 0.8


def layer_sweep(lm: LoadedModel, candidates: torch.Tensor, prompts: Mapping[str, Sequence[str]],
                layers: Sequence[int] | None = None, batch_size: int = 16, baseline: bool = True,
                mode: str = "zero", reference: Sequence[str] | None = None):
    """Arditi et al.'s generation-free layer sweep: for each candidate layer's direction (``candidates`` is
    [n_layers, d]), ablate it everywhere and measure the mean refusal score on the harmful prompts
    (``prompts["harmful"]``) and the mean KL divergence of the first-token distribution on the harmless ones
    (``prompts["harmless"]``) from the unablated model's.

    Returns a DataFrame (layer, refusal score, KL), with a first row for the unablated model (layer -1) when
    ``baseline``. ``mode``/``reference``: the ablation mode and, for "mean", its harmless reference prompts.
    Under ``REFUSAL_BOOK_PACKED_LINEAR=all`` the weights are packed for oneDNN once (``lib.packed.packed_products``),
    and inside each layer's edit only the layers it changed are packed again."""
    layers = check_layers(lm.info, layers)
    harmful, harmless = prompts["harmful"], prompts["harmless"]
    with packed_products(lm.model, "measurement"):
        means = ablation_means(lm, mode, reference, batch_size)
        clean_harmless = next_token_log_probs(lm, harmless, batch_size)
        rows = []
        if baseline:
            rows.append({"layer": -1, "refusal score": float(refusal_score_from(lm, next_token_log_probs(
                lm, harmful, batch_size)).mean()), "KL": 0.0})
        for layer in progress(layers, desc=f"sweep {lm.info.variant}"):
            with orthogonalized(lm, candidates[layer], mode, means), packed_products(lm.model, "measurement"):
                score = refusal_score_from(lm, next_token_log_probs(lm, harmful, batch_size)).mean()
                kl = kl_divergence(clean_harmless, next_token_log_probs(lm, harmless, batch_size)).mean()
            rows.append({"layer": layer, "refusal score": float(score), "KL": float(kl)})
    return pd.DataFrame(rows, columns=["layer", "refusal score", "KL"])


def _qualifying(sweep, n_layers: int, max_kl: float, max_depth: float):
    return sweep[(sweep["layer"] >= 0) & (sweep["layer"] < max_depth * n_layers) & (sweep["KL"] < max_kl)]


def selection_statement(sweeps, chosen: dict[str, int], n_layers: int, rule: LayerRule) -> str:
    """The layer choice in words, from ``select_layers``' sweeps: which variants' layers the rule chose (with the KL
    there) and which fell back (with the smallest KL of their sweep, where it was, and the KL at the fallback)."""
    by_rule, fell_back = [], []
    for variant, layer in chosen.items():
        own = sweeps[(sweeps["variant"] == variant) & (sweeps["layer"] >= 0)]
        at = float(own[own["layer"] == layer]["KL"].item())
        if _qualifying(own, n_layers, rule.max_kl, rule.max_depth).empty:
            lowest = own.sort_values(["KL", "layer"], kind="stable").iloc[0]
            fell_back.append((variant, layer, at, float(lowest["KL"]), int(lowest["layer"])))
        else:
            by_rule.append(f"{variant} at layer {layer} (KL {at:.3f})")
    parts = [f"The rule chose {', '.join(by_rule)}."] if by_rule else []
    if fell_back:
        names = ", ".join(f[0] for f in fell_back)
        smallest = [f[3] for f in fell_back]
        where = sorted({f[4] for f in fell_back})
        at = [f[2] for f in fell_back]
        layers = sorted({f[1] for f in fell_back})
        parts.append(f"No layer of the sweep kept the harmless KL under {rule.max_kl} for {names} (the smallest KL, "
                     f"{_span(smallest)}, was at layer{'s' if len(where) > 1 else ''} "
                     f"{', '.join(map(str, where))}), so {'each is' if len(fell_back) > 1 else 'it is'} attacked at "
                     f"the fallback, layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}, where "
                     f"ablation moves the harmless first token by {_span(at)} nats.")
    return " ".join(parts)


def _span(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.3f}" if f"{low:.3f}" == f"{high:.3f}" else f"{low:.3f} to {high:.3f}"


def select_layer(sweep, n_layers: int, fallback: int, max_kl: float = 0.1, max_depth: float = 0.8) -> tuple[int, str]:
    """Arditi et al.'s rule: among layers below ``max_depth`` of the depth whose ablation keeps the harmless
    first-token KL under ``max_kl``, the one whose ablation lowers the refusal score most. Where no layer qualifies,
    ``fallback`` (the paper's relative layer) is returned. Returns (layer, the reason in words)."""
    ok = _qualifying(sweep, n_layers, max_kl, max_depth)
    if ok.empty:
        return int(fallback), f"no layer kept the harmless KL under {max_kl}: the paper's relative layer"
    best = int(ok.sort_values(["refusal score", "layer"], kind="stable").iloc[0]["layer"])
    return best, f"lowest refusal score among layers with KL < {max_kl} below {max_depth:.0%} depth"


def sweep_and_select(lm: LoadedModel, candidates: torch.Tensor, prompts: Mapping[str, Sequence[str]], rule: LayerRule,
                     batch_size: int = 16, mode: str = "zero", reference: Sequence[str] | None = None):
    """``layer_sweep`` of every ``rule.stride``-th layer from layer 1, then of the unvisited layers within ``stride`` of
    the best one, and ``select_layer`` on all of them: a coarse sweep whose choice is still the best of its
    immediate neighbours (with stride 2, at about half the cost of visiting every layer). Where no layer of the
    coarse sweep qualifies, there is no best to refine: the fallback is returned without the extra layers.

    Returns (sweep DataFrame sorted by layer, chosen layer, the reason in words)."""
    fallback, stride, max_kl, max_depth = rule.fallback, rule.stride, rule.max_kl, rule.max_depth
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}.")
    n_layers = lm.info.n_layers
    sweep = layer_sweep(lm, candidates, prompts, range(1, n_layers, stride), batch_size, mode=mode,
                        reference=reference)
    layer, reason = select_layer(sweep, n_layers, fallback, max_kl, max_depth)
    visited = set(sweep["layer"])
    near = [n for n in range(layer - stride + 1, layer + stride) if 1 <= n < n_layers and n not in visited]
    if stride > 1 and layer in visited and near and not _qualifying(sweep, n_layers, max_kl, max_depth).empty:
        extra = layer_sweep(lm, candidates, prompts, near, batch_size, baseline=False, mode=mode, reference=reference)
        sweep = pd.concat([sweep, extra], ignore_index=True).sort_values("layer", kind="stable").reset_index(drop=True)
        layer, reason = select_layer(sweep, n_layers, fallback, max_kl, max_depth)
        reason += f" (a sweep at stride {stride}, then the layers next to the best)"
    return sweep, layer, reason


def select_layers(config: Config, variants: Sequence[str], candidates: dict[str, torch.Tensor],
                  prompts: Mapping[str, Sequence[str]], rule: LayerRule):
    """``sweep_and_select`` in each of ``variants`` of ``config.family`` (loaded one at a time, batches of
    ``config.score_batch_size``) with its own ``candidates[variant]``.

    Returns (one sweep DataFrame with a ``variant`` column, ``{variant: chosen layer}``, ``{variant: reason}``)."""
    results = for_each_model(config.family, variants, lambda lm: sweep_and_select(
        lm, candidates[lm.info.variant], prompts, rule, config.score_batch_size), config.device, config.dtype)
    sweeps = pd.concat([sweep.assign(variant=variant) for variant, (sweep, _, _) in results.items()],
                       ignore_index=True)
    return (sweeps, {variant: layer for variant, (_, layer, _) in results.items()},
            {variant: reason for variant, (_, _, reason) in results.items()})


def selection_table(sweeps, chosen: dict[str, int], reasons: dict[str, str]):
    """One row per variant: its unablated refusal score, the chosen layer, the score and KL with that layer's
    direction ablated, and why that layer was chosen (``sweeps`` as ``select_layers`` returns them)."""
    rows = []
    for variant, layer in chosen.items():
        own = sweeps[sweeps["variant"] == variant]
        at = own[own["layer"] == layer]
        rows.append({"variant": variant, "unablated refusal score": own[own["layer"] == -1]["refusal score"].item(),
                     "chosen layer": layer, "score when ablated": at["refusal score"].item(),
                     "KL at chosen layer": at["KL"].item(), "why": reasons[variant]})
    return pd.DataFrame(rows)
