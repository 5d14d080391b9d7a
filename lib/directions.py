"""Refusal directions: the difference in means between harmful and harmless activations (Arditi et al. 2024)."""

from __future__ import annotations

import torch


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


def unit(vectors: torch.Tensor) -> torch.Tensor:
    """Normalise along the last axis; a zero or non-finite vector is an error, never a silent NaN."""
    norms = vectors.norm(dim=-1, keepdim=True)
    if not torch.isfinite(vectors).all() or bool((norms == 0).any()):
        raise ValueError("Cannot normalise a zero or non-finite direction.")
    return vectors / norms


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
