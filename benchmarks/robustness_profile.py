"""Where the organisms chapter's robustness check spends its time (issue 22: profile first). The check attacks each
trained organism at its sites with the paper's PGD (``lib.adversary.attacked_completions``: 6 steps, each a forward
and a backward pass over prompt + refusal, then a greedy generation under the perturbation). This runs that function
once per site of the given variants on the chapter's prompts, uncached, with its PGD steps timed (under
torch.profiler) apart from the rest (mostly the generation), and prints the top operators.

``python -m benchmarks.robustness_profile [variant ...]`` (default: ssft lat).
"""

from __future__ import annotations

import sys
import time
from unittest import mock

import torch


def profile_attack(variant: str, n_prompts: int = 32, steps: int = 6, max_new_tokens: int = 24, seed: int = 42,
                   family: str = "smollm2-135m") -> list[str]:
    """One report line per attacked site, then torch.profiler's top operators of that site's PGD steps."""
    from lib import adversary, data, models, organisms
    from lib.training_data import load_refusals, refusal_for

    pairs = data.split("test", seed)[:n_prompts]
    refusals = load_refusals()
    prompts, targets = [p.harmful for p in pairs], [refusal_for(p.id, refusals) for p in pairs]
    lm = models.load(family, variant, device="cpu")
    pgd_attack = adversary.pgd_attack
    lines = []
    for label, layer in organisms.sites_attacked(family, variant).items():
        seen = {}

        def timed_pgd(lm, batch, *args, **kwargs):
            seen["shape"] = tuple(batch["input_ids"].shape)
            start = time.perf_counter()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                delta = pgd_attack(lm, batch, *args, **kwargs)
            seen["seconds"], seen["profile"] = time.perf_counter() - start, profile
            return delta

        start = time.perf_counter()
        with mock.patch.object(adversary, "pgd_attack", timed_pgd):
            adversary.attacked_completions(lm, prompts, targets, layer, organisms.chosen_radius(family, layer), steps,
                                           max_new_tokens, batch_size=n_prompts, seed=seed)
        rest = time.perf_counter() - start - seen["seconds"]
        lines += [f"{variant}, {label}: batch {seen['shape']}, PGD {steps} steps {seen['seconds']:.1f} s (profiled), "
                  f"generation of {max_new_tokens} tokens and the rest {rest:.1f} s",
                  seen["profile"].key_averages().table(sort_by="self_cpu_time_total", row_limit=6)]
    return lines


if __name__ == "__main__":
    for variant in sys.argv[1:] or ["ssft", "lat"]:
        print("\n".join(profile_attack(variant)), flush=True)
