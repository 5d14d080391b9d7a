"""Refusal directions: the difference in means between harmful and harmless activations (Arditi et al. 2024)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lib.artifacts import ArtifactError, artifact_path, load_tensors, save_tensors
from lib.linalg import pca_basis, unit
from lib.models import fingerprint


def _check_pair(harmful: torch.Tensor, harmless: torch.Tensor) -> None:
    if harmful.ndim < 2 or harmful.shape[1:] != harmless.shape[1:]:
        raise ValueError(f"Harmful {tuple(harmful.shape)} and harmless {tuple(harmless.shape)} activations must be "
                         "[n, ..., d] with matching trailing shapes.")
    if harmful.shape[0] == 0 or harmless.shape[0] == 0:
        raise ValueError("Need at least one harmful and one harmless activation.")


def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """mean(harmful) - mean(harmless) over the first axis, unnormalised (its norm is a published diagnostic)."""
    _check_pair(harmful, harmless)
    return harmful.double().mean(0).float() - harmless.double().mean(0).float()


def refusal_directions(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Unit difference-in-means directions, one per layer: ``[n, layers, d]`` x 2 -> ``[layers, d]``."""
    return unit(mean_difference(harmful, harmless))


def paired_differences(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Row i = harmful_i - harmless_i (the paper's matrix D), for index-matched pairs."""
    _check_pair(harmful, harmless)
    if harmful.shape[0] != harmless.shape[0]:
        raise ValueError(f"Paired differences need equally many harmful ({harmful.shape[0]}) and harmless "
                         f"({harmless.shape[0]}) rows.")
    return harmful - harmless


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis."""
    return (unit(a) * unit(b)).sum(-1)


def separation(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """How far apart the two classes sit along their own difference-in-means direction, per layer: the gap between
    the projected class means over the pooled standard deviation of the projections (d-prime).
    ``[n, layers, d]`` x 2 -> ``[layers]``. Where the class means coincide (e.g. at layer 0, whose input at the
    last prompt token is the same template token for every prompt) the separation is 0."""
    difference = mean_difference(harmful, harmless).double()
    norms = difference.norm(dim=-1, keepdim=True)
    direction = torch.where(norms > 0, difference / norms.clamp_min(1e-30), torch.zeros_like(difference))
    h = (harmful.double() * direction).sum(-1)
    b = (harmless.double() * direction).sum(-1)
    pooled = ((h.var(0) + b.var(0)) / 2).sqrt()
    gap = h.mean(0) - b.mean(0)
    return torch.where(pooled > 0, gap / pooled.clamp_min(1e-30), torch.zeros_like(gap)).float()


def cosine_matrix(directions: dict[str, torch.Tensor]):
    """Cosine similarity between every two named directions ([d] each): a square DataFrame."""
    names = list(directions)
    stacked = unit(torch.stack([directions[n].double() for n in names]))
    return pd.DataFrame((stacked @ stacked.T).float().numpy(), index=names, columns=names)


def convergence(harmful: torch.Tensor, harmless: torch.Tensor, sizes: list[int] | None = None):
    """How the unit direction settles as pairs are added (the paper's reason for 100 pairs): for the first n pairs,
    n = 2..N, the cosine with the all-pairs direction and the distance ||r_n - r_(n-1)|| between consecutive unit
    directions. ``[N, d]`` x 2 at one layer -> DataFrame (n, cosine to final, step distance)."""
    n_total = harmful.shape[0]
    h, b = harmful.double().cumsum(0), harmless.double().cumsum(0)
    counts = torch.arange(1, n_total + 1, dtype=torch.float64).unsqueeze(1)
    running = unit(h / counts - b / counts)
    final = running[-1]
    step = torch.cat([torch.tensor([float("nan")], dtype=torch.float64), (running[1:] - running[:-1]).norm(dim=1)])
    frame = pd.DataFrame({"n": range(1, n_total + 1), "cosine to final": (running @ final).numpy(),
                          "step distance": step.numpy()}).iloc[1:]
    return frame if sizes is None else frame[frame["n"].isin(sizes)]


def settled_at(frame, tolerance: float = 0.01) -> int | None:
    """The smallest n from which every later consecutive step distance stays below ``tolerance`` (None if never)."""
    above = frame[frame["step distance"] >= tolerance]
    if above.empty:
        return int(frame["n"].min())
    last = int(above["n"].max())
    return last + 1 if last < int(frame["n"].max()) else None


def settling(frames: dict, tolerance: float = 0.01, at_n: int = 100) -> tuple:
    """The paper's check of how many pairs a direction needs, per variant (``frames[variant]`` is a
    ``convergence`` frame): the n from which every step stays below ``tolerance`` (``settled_at``; None: never within
    the pairs available) and the cosine of the ``at_n``-pair direction with the all-pairs one (None with fewer
    pairs). Returns (DataFrame, the outcome in one sentence)."""
    rows = []
    for variant, frame in frames.items():
        cosine = frame[frame["n"] == at_n]["cosine to final"]
        rows.append({"variant": variant, f"steps stay below {tolerance} from n": settled_at(frame, tolerance),
                     f"cosine at n = {at_n} with all pairs": float(cosine.iloc[0]) if len(cosine) else None})
    table = pd.DataFrame(rows)
    settled = table.iloc[:, 1]
    n_pairs = max(int(frame["n"].max()) for frame in frames.values())
    unsettled = [v for v, n in zip(table["variant"], settled) if n is None or pd.isna(n)]
    criterion = f"By the paper's criterion (every later step below {tolerance}), "
    if len(unsettled) == len(table):
        head = f"{criterion}no variant's direction settled within the {n_pairs} pairs"
    else:
        head = (f"{criterion}the directions settled from n = "
                + ", ".join(f"{v} {int(n)}" for v, n in zip(table["variant"], settled) if v not in unsettled)
                + (f"; {', '.join(unsettled)} not within the {n_pairs} pairs" if unsettled else ""))
    cosines = table.iloc[:, 2].dropna()
    tail = (f"; the {at_n}-pair direction's cosine with the all-pairs one is {cosines.min():.3f} to {cosines.max():.3f}"
            if len(cosines) else "")
    return table, f"{head}{tail}."


def top_pc_removed_direction(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """The paper's variant: fit a 1-component PCA on the pooled activations ([n, d] each, one layer), remove that
    component from every activation, then take the unit difference in means."""

    pooled = torch.cat([harmful, harmless]).double()
    mean, axes = pca_basis(pooled, k=1)
    pc = axes.double()[0]

    def remove(x: torch.Tensor) -> torch.Tensor:
        centred = x.double() - mean.double()
        return x.double() - (centred @ pc).unsqueeze(1) * pc

    return unit(mean_difference(remove(harmful), remove(harmless)).double()).float()


def probe_accuracy(harmful: torch.Tensor, harmless: torch.Tensor, kind: str = "logistic", folds: int = 5,
                   seed: int = 0) -> dict[str, float]:
    """Cross-validated accuracy of a harmful-vs-harmless probe on one layer's activations ([n, d] each): mean and
    a 95% normal interval over the pooled held-out predictions. ``kind``: "logistic" (standardised features,
    L2 logistic regression) or "forest" (random forest, 200 trees)."""
    if kind == "logistic":
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    elif kind == "forest":
        model = RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1)
    else:
        raise ValueError(f"Unknown probe {kind!r}; use 'logistic' or 'forest'.")
    x = torch.cat([harmful, harmless]).double().numpy()
    y = np.r_[np.ones(len(harmful)), np.zeros(len(harmless))]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    correct = cross_val_predict(model, x, y, cv=splitter) == y
    accuracy = float(correct.mean())
    half = 1.959964 * float(np.sqrt(accuracy * (1 - accuracy) / len(y)))
    return {"accuracy": accuracy, "low": max(0.0, accuracy - half), "high": min(1.0, accuracy + half), "n": len(y)}


def probe_frame(acts: dict[str, dict], layers: dict[str, list[int]], kind: str = "logistic", folds: int = 5,
                seed: int = 0):
    """``probe_accuracy`` of each variant's activations (``{variant: {"harmful", "harmless": [n, layers, d]}}``)
    at each of its ``layers``: one row per (variant, layer) with accuracy, interval and n."""
    return pd.DataFrame([{"variant": v, "layer": layer, **probe_accuracy(acts[v]["harmful"][:, layer],
                                                                         acts[v]["harmless"][:, layer], kind, folds,
                                                                         seed)}
                         for v, chosen in layers.items() for layer in chosen])


def save_directions(family: str, per_variant: dict[str, dict[str, torch.Tensor]], metadata: dict):
    """Write every variant's directions (``{"unit": [layers, d], "mean_difference": [layers, d]}``) and the
    selection metadata (chosen layers, sweep) as one artifact: ``artifacts/directions/<family>.safetensors``."""
    tensors = {f"{variant}/{name}": t for variant, parts in per_variant.items() for name, t in parts.items()}
    return save_tensors(artifact_path("directions", family, suffix=".safetensors"), tensors, metadata)


def load_directions(family: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The artifact written by the refusal-directions chapter: (``{variant: {"unit", "mean_difference"}}``,
    metadata with the chosen layer per variant)."""
    tensors, meta = load_tensors(artifact_path("directions", family, suffix=".safetensors"))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        variant, part = name.split("/")
        out.setdefault(variant, {})[part] = tensor
    return out, meta


def _check_fingerprint(metadata: dict, family: str, variant: str, current: str) -> None:

    stored = metadata.get("fingerprints", {}).get(variant)
    if stored != current:
        raise ArtifactError(f"The stored directions for {family}/{variant} were computed from other weights "
                            f"(fingerprint {stored} != {current}); re-run book/04_directions.")


def check_matches(metadata: dict, info) -> None:
    """Raise if a directions artifact was computed from other weights than the loaded model's (``info`` is
    ``LoadedModel.info``): re-run the directions chapter after retraining or changing a variant."""
    _check_fingerprint(metadata, info.family, info.variant, info.fingerprint)


def check_current(metadata: dict, family: str, variants, device: str = "auto", dtype: str = "auto") -> None:
    """``check_matches`` for ``variants`` without loading them (``lib.models.fingerprint``): a chapter calls it
    before it computes anything, so that directions left from weights since retrained never reach a verdict."""
    for variant in variants:
        _check_fingerprint(metadata, family, variant, fingerprint(family, variant, device, dtype))


def load_current(family: str, variants, device: str = "auto", dtype: str = "auto"):
    """``load_directions`` after ``check_current`` for ``variants``: what a chapter that reads the directions calls
    first, so that nothing it computes comes from directions of weights since retrained."""
    stored, metadata = load_directions(family)
    check_current(metadata, family, variants, device, dtype)
    return stored, metadata


LAYER_RULES = ("chosen", "paper")


def attack_layers(metadata: dict, variants, layer_rule: str = "chosen") -> dict[str, int]:
    """Each variant's attack layer: the directions chapter's choice (``"chosen"``) or the paper's relative layer
    (``"paper"``) for all."""
    if layer_rule not in LAYER_RULES:
        raise ValueError(f"layer_rule = {layer_rule!r}: use one of {LAYER_RULES}.")
    return {v: metadata["chosen_layers"][v] if layer_rule == "chosen" else metadata["paper_layer"] for v in variants}


def layer_table(metadata: dict, layers: dict[str, int], layer_rule: str = "chosen"):
    """A DataFrame, one row per source: its attack layer (``attack_layers``) and why it is that layer."""
    why = {v: metadata["reasons"][v] if layer_rule == "chosen" else "the paper's relative layer" for v in layers}
    rows = [{"source": v, "layer": layer, "why": why[v]} for v, layer in layers.items()]
    return pd.DataFrame(rows).set_index("source")


def layer_directions(mean_differences: torch.Tensor) -> torch.Tensor:
    """Unit directions per layer from ``[layers, d]`` mean differences, with an all-zero row wherever the two
    classes' means coincide (e.g. layer 0 at a template token, where every prompt has the same input); ablating
    such a row is refused by ``lib.ablation.check_directions``."""
    norms = mean_differences.double().norm(dim=-1, keepdim=True)
    if not torch.isfinite(mean_differences).all():
        raise ValueError("The mean differences contain NaN or infinite values.")
    return torch.where(norms > 0, mean_differences.double() / norms.clamp_min(1e-30), 0.0).float()
