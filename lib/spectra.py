"""Spectra of activation matrices: the SVD energy fractions of the paper's difference matrix D, and PCA bases.

The paper's "explained variance" of component k is s_k^2 / sum_j s_j^2 of the UNcentred D (an energy fraction);
``centred=True`` gives ordinary PCA explained variance. Both are reported because centring changes the answer.
"""

from __future__ import annotations

import torch


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


def pca_basis(matrix: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], top-k principal axes [k, d]) of the rows of ``matrix``; each axis' sign is fixed so that its
    largest-magnitude coordinate is positive (reruns and platforms then agree)."""
    if matrix.ndim != 2 or matrix.shape[0] < 2:
        raise ValueError(f"PCA needs an [n >= 2, d] matrix, got shape {tuple(matrix.shape)}.")
    x = matrix.double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    axes = vh[:k]
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    return mean.float(), (axes * signs).float()


def pca_project(matrix: torch.Tensor, mean: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """Coordinates of ``matrix`` rows on the PCA ``axes`` (from ``pca_basis``)."""
    return (matrix.double() - mean.double()) @ axes.double().T


def pca_frame(harmful: torch.Tensor, harmless: torch.Tensor, slots: list[int], labels: list[int], variant: str):
    """PCA coordinates of harmless, harmful and ablated-harmful activations at chosen layers (a DataFrame with
    columns variant, layer, kind, pc1, pc2).

    ``harmful``/``harmless`` are [n, layers, d]; ``slots`` index their layer axis and ``labels`` name those layers.
    The PCA is fitted on harmful and harmless together; "harmful, ablated" is each harmful activation with that
    layer's unit difference-in-means direction projected out — the ablated activation itself, plotted in the same
    axes (the original code plotted the projection instead).
    """
    import pandas as pd

    from lib.ablation import project_out
    from lib.directions import refusal_directions

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
    import pandas as pd

    rows = []
    for name, matrix in differences.items():
        for measure, centred in (("uncentred (paper)", False), ("centred (PCA)", True)):
            shares = top_k_shares(energy_fractions(matrix, centred), ks)
            rows.append({"variant": name, "measure": measure, "n": matrix.shape[0],
                         **{f"top-{k}": shares[k] for k in ks}})
    return pd.DataFrame(rows)


def scree_frame(differences: dict[str, torch.Tensor], components: int = 10):
    """Per-component and cumulative energy fractions of the first ``components`` (both measures): a DataFrame
    (variant, measure, component, share, cumulative)."""
    import pandas as pd

    rows = []
    for name, matrix in differences.items():
        for measure, centred in (("uncentred (paper)", False), ("centred (PCA)", True)):
            fractions = energy_fractions(matrix, centred).double()
            for k in range(min(components, len(fractions))):
                rows.append({"variant": name, "measure": measure, "component": k + 1,
                             "share": float(fractions[k]), "cumulative": float(fractions[: k + 1].sum())})
    return pd.DataFrame(rows)


def layer_share_frame(differences: dict[str, torch.Tensor], k: int = 2, centred: bool = False):
    """Top-``k`` share at every layer for each named [n, layers, d] difference tensor: DataFrame (variant, layer,
    share)."""
    import pandas as pd

    rows = []
    for name, tensor in differences.items():
        for layer in range(tensor.shape[1]):
            matrix = tensor[:, layer]
            if float(matrix.double().abs().sum()) == 0:
                continue  # e.g. layer 0 at a template token: identical inputs, no spectrum
            share = top_k_shares(energy_fractions(matrix, centred), (k,))[k]
            rows.append({"variant": name, "layer": layer, "share": share})
    return pd.DataFrame(rows)


def bootstrap_shares(matrix: torch.Tensor, k: int = 2, n_boot: int = 1000, seed: int = 0,
                     centred: bool = False) -> torch.Tensor:
    """Top-``k`` share of ``matrix`` ([n, d]) recomputed on ``n_boot`` resamples of its rows (pairs)."""
    from lib.judges import bootstrap_indices

    index = bootstrap_indices(matrix.shape[0], n_boot, seed)
    x = matrix.double()
    shares = []
    for rows in index:
        sample = x[rows]
        if centred:
            sample = sample - sample.mean(0, keepdim=True)
        energy = torch.linalg.svdvals(sample).square()
        shares.append(float(energy[:k].sum() / energy.sum()))
    return torch.tensor(shares, dtype=torch.float64)


def share_intervals(differences: dict[str, torch.Tensor], k: int = 2, n_boot: int = 1000, seed: int = 0,
                    centred: bool = False):
    """Top-``k`` share with a 95% percentile bootstrap interval over pairs, per variant, plus the paired
    bootstrap of every variant's share minus every other's (the same resampled pairs for all variants, whose
    pairs are the same prompts). Returns (per-variant DataFrame, pairwise-difference DataFrame)."""
    import pandas as pd

    boots = {name: bootstrap_shares(m, k, n_boot, seed, centred) for name, m in differences.items()}
    point = {name: top_k_shares(energy_fractions(m, centred), (k,))[k] for name, m in differences.items()}
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    single = pd.DataFrame([{"variant": name, f"top-{k}": point[name],
                            **dict(zip(("low", "high"), torch.quantile(boots[name], q).tolist())),
                            "n": differences[name].shape[0]} for name in differences])
    pairs = []
    for a in differences:
        for b in differences:
            if a != b and differences[a].shape[0] == differences[b].shape[0]:
                low, high = torch.quantile(boots[a] - boots[b], q).tolist()
                pairs.append({"variant": a, "versus": b, "difference": point[a] - point[b], "low": low,
                              "high": high})
    return single, pd.DataFrame(pairs)


def svd_directions(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The top-``k`` right singular vectors ([k, d]) of the uncentred ``matrix`` (the paper's D), each signed so that
    it points along the mean row (harmful minus harmless)."""
    x = matrix.double()
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:k]
    signs = torch.sign(axes @ x.mean(0))
    signs[signs == 0] = 1
    return (axes * signs.unsqueeze(1)).float()
