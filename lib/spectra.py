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
