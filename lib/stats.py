"""Statistics every chapter's intervals share: seeded bootstrap resamples, the 95% percentile and basic bootstrap
intervals, the Wilson interval of a proportion, and the words for an interval's verdict.

The bottom layer of lib: it imports torch and nothing from lib, so every other module can use it.
"""

from __future__ import annotations

import math

import torch


LEVEL = (0.025, 0.975)  # the two quantiles of every 95% interval in the book
# A bound closer to 0 than this fraction of its interval's width decides nothing: the last bits of float32, which
# differ between CPU generations, can move it to the other side (module docstring of ``verdict``).
EDGE_FRACTION = 1e-3
ON_THE_EDGE = "on the edge"


def bootstrap_indices(n: int, n_boot: int = 2000, seed: int = 0) -> torch.Tensor:
    """[n_boot, n] resampling indices (with replacement) from a seeded generator: the same seed gives the same
    resamples, so paired comparisons reuse them."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"Need n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}.")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (n_boot, n), generator=generator)


def percentile_interval(samples: torch.Tensor) -> tuple[float, float]:
    """95% percentile interval of bootstrap ``samples`` (their 2.5% and 97.5% quantiles, in float64)."""
    return tuple(torch.quantile(samples.double(), torch.tensor(LEVEL, dtype=torch.float64)).tolist())


def bootstrap_mean_interval(values: torch.Tensor, index: torch.Tensor) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` (1-D) over the resamples ``index`` (``bootstrap_indices``)."""
    return percentile_interval(values.double()[index].mean(1))


def basic_interval(estimate: float, boots: torch.Tensor) -> tuple[float, float]:
    """95% basic (reverse-percentile) bootstrap interval: (2 estimate - q97.5, 2 estimate - q2.5).

    Spectral shares need it: a resample repeats pairs, which concentrates the spectrum, so resampled shares sit
    above the estimate (for example an uncentred top-10 share of 0.527 whose resamples span 0.553-0.611). The
    percentile interval would carry that bias; the basic interval reflects it back around the estimate."""
    low_q, high_q = percentile_interval(boots)
    return 2 * estimate - high_q, 2 * estimate - low_q


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0% and 100%, unlike the normal one)."""
    if n <= 0:
        raise ValueError("n must be positive.")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def on_the_edge(low: float, high: float) -> bool:
    """Whether a bound of the interval lies within ``EDGE_FRACTION`` of its width from 0 without being 0 itself.

    Such a verdict could flip with the last bits of a float: scores and spectral shares are float32 results whose
    last bits depend on the CPU's kernels, and a bound that close to 0 can land on either side. A bound of exactly 0
    (a rate difference from judged labels, computed exactly) stays undecided on every host."""
    tolerance = EDGE_FRACTION * abs(high - low)
    return any(0 < abs(bound) <= tolerance for bound in (low, high))


def verdict(low: float, high: float, positive: str, negative: str, undecided: str) -> str:
    """Words for a 95% interval of a difference: ``positive`` if it lies above 0, ``negative`` below, else
    ``undecided``; ``ON_THE_EDGE`` when a bound is too close to 0 to decide on every CPU (``on_the_edge``)."""
    if on_the_edge(low, high):
        return ON_THE_EDGE
    return positive if low > 0 else negative if high < 0 else undecided


def interval_text(value: float, low: float, high: float, spec: str = ".3f") -> str:
    """An estimate and its interval as the book writes them, ``"value [low, high]"``, each number in format
    ``spec`` (e.g. ``"+.1f"`` for signed differences)."""
    return f"{value:{spec}} [{low:{spec}}, {high:{spec}}]"
