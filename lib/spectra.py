"""Spectra of activation matrices: the SVD energy fractions of the paper's difference matrix D, and PCA bases.

The paper's "explained variance" of component k is s_k^2 / sum_j s_j^2 of the UNcentred D (an energy fraction);
``centred=True`` gives ordinary PCA explained variance. Both are reported because centring changes the answer.
"""

from __future__ import annotations

import pandas as pd
import torch

from lib.capture import norms_frame, pair_activations
from lib.directions import refusal_directions, separation
from lib.linalg import pca_basis, pca_project, project_out
from lib.models import PAPER_PCA_LAYERS, scale_layer
from lib.stats import basic_interval, bootstrap_indices


def energy_fractions(matrix: torch.Tensor, centred: bool = False) -> torch.Tensor:
    """s_k^2 / sum s^2 for the rows of ``matrix`` [n, d] (centred on the row mean first when ``centred``)."""
    if matrix.ndim != 2 or min(matrix.shape) == 0:
        raise ValueError(f"Expected a non-empty [n, d] matrix, got shape {tuple(matrix.shape)}.")
    x = matrix.double()
    if centred:
        x = x - x.mean(0, keepdim=True)
    singular = torch.linalg.svdvals(x)
    energy = singular.square()
    total = energy.sum()
    if total == 0:
        raise ValueError("The matrix is all zeros; its spectrum is undefined.")
    return (energy / total).float()


def pca_frame(harmful: torch.Tensor, harmless: torch.Tensor, slots: list[int], labels: list[int], variant: str):
    """PCA coordinates of harmless, harmful and ablated-harmful activations at chosen layers (a DataFrame with
    columns variant, layer, kind, pc1, pc2).

    ``harmful``/``harmless`` are [n, layers, d]; ``slots`` index their layer axis and ``labels`` name those layers.
    The PCA is fitted on harmful and harmless together; "harmful, ablated" is each harmful activation with that
    layer's unit difference-in-means direction projected out — the ablated activation itself, plotted in the same
    axes (the original code plotted the projection instead).
    """
    frames = []
    for slot, label in zip(slots, labels):
        h, b = harmful[:, slot].float(), harmless[:, slot].float()
        direction = refusal_directions(h, b).unsqueeze(0)
        mean, axes = pca_basis(torch.cat([h, b]), k=2)
        for kind, acts in (("harmless", b), ("harmful", h), ("harmful, ablated", project_out(h, direction))):
            coords = pca_project(acts, mean, axes)
            frames.append(pd.DataFrame({"variant": variant, "layer": label, "kind": kind,
                                        "pc1": coords[:, 0].numpy(), "pc2": coords[:, 1].numpy()}))
    return pd.concat(frames, ignore_index=True)


# The paper's saved outputs (n = 416 pairs, layer 14 of 32, uncentred): component 1, top-2, top-10 energy fractions.
PAPER_SHARES = {"ssft": {1: 0.4885, 2: 0.53, 10: 0.6837}, "at": {1: 0.4309, 2: 0.47, 10: 0.6340},
                "lat": {1: 0.5144, 2: 0.73, 10: 0.8343}}
PAPER_LAYER = 14  # of 32


def top_k_shares(fractions: torch.Tensor, ks=(1, 2, 10)) -> dict[int, float]:
    """Cumulative share of the first k components, for each k."""
    cumulative = fractions.double().cumsum(0)
    return {k: float(cumulative[min(k, len(cumulative)) - 1]) for k in ks}


def spectrum_frame(differences: dict[str, torch.Tensor], ks=(1, 2, 10)):
    """Top-k shares of each named difference matrix ([n, d]), uncentred (the paper's) and centred (PCA):
    a DataFrame (variant, measure, n, top-1, top-2, top-10)."""
    rows = []
    for name, matrix in differences.items():
        for measure, centred in (("uncentred (paper)", False), ("centred (PCA)", True)):
            shares = top_k_shares(energy_fractions(matrix, centred), ks)
            rows.append({"variant": name, "measure": measure, "n": matrix.shape[0],
                         **{f"top-{k}": shares[k] for k in ks}})
    return pd.DataFrame(rows)


def scree_frame(differences: dict[str, torch.Tensor], components: int = 10, n_boot: int = 0, seed: int = 0):
    """Per-component and cumulative energy fractions of the first ``components`` (both measures): a DataFrame
    (variant, measure, component, share, cumulative), plus 95% basic bootstrap intervals over pairs (``low``,
    ``high``, ``cumulative_low``, ``cumulative_high``) when ``n_boot`` > 0, from the same resamples as
    ``share_intervals`` with the same seed."""
    rows = []
    for name, matrix in differences.items():
        for measure, centred in (("uncentred (paper)", False), ("centred (PCA)", True)):
            fractions = energy_fractions(matrix, centred).double()
            count = min(components, len(fractions))
            if n_boot:
                resampled = bootstrap_fractions(matrix, n_boot, seed, centred)
                boots, boot_cumulative = resampled[:, :count], resampled.cumsum(-1)[:, :count]
            for k in range(count):
                row = {"variant": name, "measure": measure, "component": k + 1,
                       "share": float(fractions[k]), "cumulative": float(fractions[: k + 1].sum())}
                if n_boot:
                    row["low"], row["high"] = basic_interval(row["share"], boots[:, k])
                    row["cumulative_low"], row["cumulative_high"] = basic_interval(row["cumulative"],
                                                                                   boot_cumulative[:, k])
                rows.append(row)
    return pd.DataFrame(rows)


def layer_share_frame(differences: dict[str, torch.Tensor], k: int = 2, centred: bool = False, n_boot: int = 0,
                      seed: int = 0):
    """Top-``k`` share at every layer for each named [n, layers, d] difference tensor: DataFrame (variant, layer,
    share), plus ``low``/``high`` (95% basic bootstrap interval over pairs, see ``share_intervals``) when
    ``n_boot`` > 0."""
    rows = []
    for name, tensor in differences.items():
        for layer in range(tensor.shape[1]):
            matrix = tensor[:, layer]
            if float(matrix.double().abs().sum()) == 0:
                continue  # e.g. layer 0 at a template token: identical inputs, no spectrum
            share = top_k_shares(energy_fractions(matrix, centred), (k,))[k]
            row = {"variant": name, "layer": layer, "share": share}
            if n_boot:
                boots = bootstrap_shares(matrix, (k,), n_boot, seed, centred)[:, 0]
                row["low"], row["high"] = basic_interval(share, boots)
            rows.append(row)
    return pd.DataFrame(rows)


def _energies_from_gram(gram: torch.Tensor, centred: bool) -> torch.Tensor:
    """Squared singular values, largest first, of matrices given by their row Gram matrices [..., n, n] (the same
    numbers as ``svdvals(x)**2`` for x with x x^T = gram, at a fraction of the cost when n < d)."""
    if centred:
        n = gram.shape[-1]
        centring = torch.eye(n, dtype=gram.dtype) - 1.0 / n
        gram = centring @ gram @ centring
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)


def bootstrap_fractions(matrix: torch.Tensor, n_boot: int = 1000, seed: int = 0, centred: bool = False,
                        chunk: int = 100) -> torch.Tensor:
    """Energy fractions of every component of ``matrix`` ([n, d]) recomputed on ``n_boot`` resamples of its rows
    (pairs): [n_boot, n], largest first.

    A resample's Gram matrix is a re-indexing of the full one (x[r] x[r]^T = G[r][:, r]), so each resample costs
    one batched eigendecomposition of an [n, n] matrix rather than an SVD of an [n, d] one."""

    if matrix.ndim != 2 or min(matrix.shape) == 0:
        raise ValueError(f"Expected a non-empty [n, d] matrix, got shape {tuple(matrix.shape)}.")
    x = matrix.double()
    gram = x @ x.T
    index = bootstrap_indices(x.shape[0], n_boot, seed)
    fractions = []
    for rows in index.split(chunk):
        energy = _energies_from_gram(gram[rows.unsqueeze(-1), rows.unsqueeze(-2)], centred)
        fractions.append(energy / energy.sum(-1, keepdim=True))
    return torch.cat(fractions)


def bootstrap_shares(matrix: torch.Tensor, ks=(1, 2, 10), n_boot: int = 1000, seed: int = 0,
                     centred: bool = False) -> torch.Tensor:
    """Top-k shares of ``matrix`` ([n, d]) recomputed on ``n_boot`` resamples of its rows (pairs): [n_boot, len(ks)]
    (every k from the same resamples, ``bootstrap_fractions``)."""
    columns = [min(k, matrix.shape[0]) - 1 for k in ks]
    return bootstrap_fractions(matrix, n_boot, seed, centred).cumsum(-1)[:, columns]


def share_intervals(differences: dict[str, torch.Tensor], ks=(1, 2, 10), n_boot: int = 1000, seed: int = 0,
                    centred: bool = False, components=()):
    """Top-k shares, and the own shares of the single ``components`` (s_c^2 / sum s^2, labelled "component c"),
    with 95% basic bootstrap intervals over pairs (``basic_interval``), per variant and measure, and the paired
    bootstrap of every variant's value minus every other's (the same resampled pairs for all variants, whose pairs
    are the same prompts, and for every measure).

    Returns (per-variant DataFrame: variant, k, share, low, high, bias, n — ``k`` names the measure, "top-2" or
    "component 2"; ``bias`` is the mean resampled share minus the estimate; pairwise DataFrame: variant, versus, k,
    difference, low, high)."""
    def measures(fractions: torch.Tensor) -> torch.Tensor:  # [..., n] fractions -> [..., measures]
        last = fractions.shape[-1] - 1
        top = fractions.cumsum(-1)[..., [min(k - 1, last) for k in ks]]
        return torch.cat([top, fractions[..., [c - 1 for c in components]]], -1)

    labels = [f"top-{k}" for k in ks] + [f"component {c}" for c in components]
    boots = {name: measures(bootstrap_fractions(m, n_boot, seed, centred)) for name, m in differences.items()}
    point = {name: measures(energy_fractions(m, centred).double()).tolist() for name, m in differences.items()}
    single, pairs = [], []
    for j, label in enumerate(labels):
        for name in differences:
            low, high = basic_interval(point[name][j], boots[name][:, j])
            single.append({"variant": name, "k": label, "share": point[name][j], "low": low, "high": high,
                           "bias": float(boots[name][:, j].mean()) - point[name][j],
                           "n": differences[name].shape[0]})
        for a in differences:
            for b in differences:
                if a != b and differences[a].shape[0] == differences[b].shape[0]:
                    difference = point[a][j] - point[b][j]
                    low, high = basic_interval(difference, boots[a][:, j] - boots[b][:, j])
                    pairs.append({"variant": a, "versus": b, "k": label, "difference": difference,
                                  "low": low, "high": high})
    return pd.DataFrame(single), pd.DataFrame(pairs)


def band_share_intervals(differences: dict[str, torch.Tensor], layers, ks=(1, 2), n_boot: int = 1000, seed: int = 0,
                         components=(2,)):
    """``share_intervals`` (uncentred) at every layer of ``layers`` of the named [n, layers, d] difference tensors:
    the pairwise table with a ``layer`` column, for the claim-2 verdict at every layer of a band."""
    return pd.concat([share_intervals({name: d[:, layer] for name, d in differences.items()}, ks, n_boot, seed,
                                      components=components)[1].assign(layer=layer) for layer in layers],
                     ignore_index=True)


def svd_directions(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The top-``k`` right singular vectors ([k, d]) of the uncentred ``matrix`` (the paper's D), each signed so that
    it points along the mean row (harmful minus harmless)."""
    x = matrix.double()
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:k]
    signs = torch.sign(axes @ x.mean(0))
    signs[signs == 0] = 1
    return (axes * signs.unsqueeze(1)).float()


def activation_overview(lm, pairs, dataset: str, layers=None, sites=("resid_pre",), position: int = -1,
                        pca_layers=None, batch_size: int = 16) -> dict:
    """The activation-collection chapter's view of one model: its pairs' activations (``pair_activations``, cached)
    summarised as ``{"norms": norms_frame, "pca": pca_frame at the shown layers, "separation": Series by layer,
    "summary": one row describing the artifact}``, all at ``resid_pre``."""
    info = lm.info
    if "resid_pre" not in sites:
        raise ValueError(f"sites = {list(sites)}: the overview summarises resid_pre, so sites must include it "
                         "(add \"resid_pre\" to sites).")
    chosen = list(range(info.n_layers)) if layers is None else list(layers)
    shown = shown_layers(info.n_layers, chosen, pca_layers)  # before the capture: a bad pca_layers fails at once
    tensors, meta = pair_activations(lm, pairs, dataset, chosen, sites, position, batch_size)
    harmful, harmless = tensors["harmful/resid_pre"], tensors["harmless/resid_pre"]
    summary = {"variant": info.variant, "pairs": meta["n_pairs"], "layers": len(chosen), "d_model": info.d_model,
               "sites": ", ".join(meta["sites"]), "dtype": meta["dtype"], "template": meta["template"],
               "data sha256": meta["data_sha256"][:12]}
    return {"norms": norms_frame(tensors, info.variant, "resid_pre", chosen),
            "pca": pca_frame(harmful, harmless, [chosen.index(l) for l in shown], shown, info.variant),
            "separation": pd.Series(separation(harmful, harmless).numpy(), index=chosen), "summary": summary}


def shown_layers(n_layers: int, collected: list[int], requested: list[int] | None) -> list[int]:
    """The layers a chapter plots: ``requested`` (default: the paper's plotted layers scaled to this depth) that
    were collected. An empty result is an error naming both lists."""
    wanted = sorted({scale_layer(layer, n_layers) for layer in PAPER_PCA_LAYERS}) if requested is None \
        else list(requested)
    shown = [layer for layer in wanted if layer in collected]
    if not shown:
        raise ValueError(f"None of the layers to plot {wanted} was collected (layers = {collected}): add one "
                             "of them to layers, or set pca_layers to layers you collect.")
    return shown
