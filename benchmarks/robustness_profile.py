"""Where the organisms chapter's robustness check spends its time (issue 22: profile first). The check attacks each
trained organism at its sites with the paper's PGD (``lib.adversary.attacked_completions``: 6 steps, each a forward
and a backward pass over prompt + refusal, then a greedy generation under the perturbation). This runs one attack
per site of the given variants on the chapter's prompts, timing the PGD steps (under torch.profiler) and the
generation apart, and prints the top operators.

``python -m benchmarks.robustness_profile [variant ...]`` (default: ssft lat).
"""

from __future__ import annotations

import sys
import time

import torch


def profile_attack(variant: str, n_prompts: int = 32, steps: int = 6, max_new_tokens: int = 24, seed: int = 42,
                   family: str = "smollm2-135m") -> list[str]:
    """One report line per attacked site, then torch.profiler's top operators of that site's PGD steps."""
    from lib import adversary, data, models, organisms
    from lib.hooks import attached, site_hook
    from lib.inputs import encode
    from lib.losses import response_loss
    from lib.training_data import load_refusals, refusal_for

    pairs = data.split("test", seed)[:n_prompts]
    refusals = load_refusals()
    prompts, targets = [p.harmful for p in pairs], [refusal_for(p.id, refusals) for p in pairs]
    lm = models.load(family, variant, device="cpu")
    lines = []
    for label, layer in organisms.sites_attacked(family, variant).items():
        batch, width = adversary._attack_batch(lm, prompts, targets)
        prompt_mask = batch["attention_mask"].clone()
        prompt_mask[:, width:] = 0
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            delta = adversary.pgd_attack(lm, batch, layer, organisms.chosen_radius(family, layer), steps,
                                         torch.Generator().manual_seed(seed), prompt_mask, response_loss)[:, :width]
        pgd = time.perf_counter() - start

        def add_on_prefill(hidden):
            return hidden + delta if hidden.shape[1] == width else None

        start = time.perf_counter()
        with torch.inference_mode(), attached([site_hook(lm.info, "resid_pre", layer, add_on_prefill)]):
            lm.model.generate(**encode(lm, prompts), do_sample=False, max_new_tokens=max_new_tokens,
                              pad_token_id=lm.tokenizer.pad_token_id)
        generation = time.perf_counter() - start
        lines += [f"{variant}, {label}: batch {tuple(batch['input_ids'].shape)}, PGD {steps} steps {pgd:.1f} s "
                  f"(profiled), generation of {max_new_tokens} tokens {generation:.1f} s",
                  profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=6)]
    return lines


if __name__ == "__main__":
    for variant in sys.argv[1:] or ["ssft", "lat"]:
        print("\n".join(profile_attack(variant)), flush=True)
