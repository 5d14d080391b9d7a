"""The experiment settings that travel together through a chapter's calls, in one object.

A chapter builds one ``Config`` from its parameters and passes it to the stages that load models and compute
(``lib.transfer``, ``lib.layer_selection``, ``lib.audit``), instead of repeating the same six values in every call.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """Which model family, where it computes, and the sizes and seed of its computations.

    ``batch_size`` is for generation (greedy completions), ``score_batch_size`` for the generation-free passes
    (refusal scores, KL, layer sweeps), which hold every position's logits; ``n_boot`` resamples make each bootstrap
    interval, and ``seed`` fixes them and every other random choice."""

    family: str
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 32
    score_batch_size: int = 16
    n_boot: int = 2000
    seed: int = 0
