"""The linear algebra of the study: unit directions, projecting a subspace out, PCA axes.

Part of lib's bottom layer with ``lib.stats``: it imports torch and nothing from lib, so the modules above
(directions, spectra, ablation) share these functions without importing one another.
"""

from __future__ import annotations

import torch


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """Normalise along the last axis; a zero or non-finite vector is an error, never a silent NaN."""
    norms = vectors.norm(dim=-1, keepdim=True)
    if not torch.isfinite(vectors).all() or bool((norms == 0).any()):
        raise ValueError("A direction is zero or not finite; pass a non-zero, finite vector.")
    return vectors / norms


def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x - (x B^T) B for an orthonormal basis B [k, d] (cast to x's dtype and device)."""
    basis = basis.to(device=x.device, dtype=x.dtype)
    return x - (x @ basis.T) @ basis


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
