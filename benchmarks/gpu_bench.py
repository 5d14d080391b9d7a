"""The paper-scale workload on a GPU without weights or network: a random model with Llama-2-7B's shapes in bfloat16.

``paper_batch``: ``--batch-prompts`` (the paper's 16) x 64 new tokens: plain ``generate`` | lib hooks | lib
orthogonalised weights | the paper's loop (no KV cache), against the paper's ~20 s per batch of 16; at the transfer
batch (``--batch-prompts 512``) the GPU has work to do and the loop's cost shows. ``transfer``: ``--conditions`` (the
3x3 matrix and 3 unablated) x 520 prompts x 64 tokens through ``lib.generation.generate`` with orthogonalised weights
and the automatic batch, projected past ``--budget-s``, against the paper's ~1.7 h for its 3x3 matrix. Prompts are
12 to 32 random words in the paper's template; random weights rarely stop early, the worst case for time.
``--smoke`` runs the same code with tiny shapes, on the CPU if need be."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from benchmarks import common
from benchmarks.common import agreement, hf_greedy, log, paired, random_directions, recompute_greedy
from benchmarks.standin import random_llama
from lib import batching
from lib.ablation import ablated, orthogonalized
from lib.generation import generate
from lib.inputs import encode
from lib.models import LoadedModel, PromptTemplate, describe, prepare_tokenizer
from lib.runtime import resolve_dtype

PAPER_TEMPLATE = "\n[INST]{prompt}[/INST]\n"
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512, rms_norm_eps=1e-5)
PAPER_BATCH_SECONDS = 20.0  # the paper: ~20 s per batch of 16 prompts x 64 tokens
PAPER_MATRIX_SECONDS = 9 * 11 * 60  # the paper: ~11 min per (model, layer) x 9 cells = ~1.7 h
PLAIN, HOOKS, ORTHO = ("plain generate, no ablation (the limit)", "lib hooks + KV cache",
                       "lib orthogonalised weights + KV cache (incl. the weight edit)")
LOOP = "paper's loop: full prefix every token, no KV cache (lib hooks)"
LONGEST = 3 + 32 + 4  # the longest prompt random_prompts draws, templated


def random_prompts(n: int, vocab_size: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 33, (n,), generator=generator)
    return [" ".join(f"w{int(i)}" for i in torch.randint(5, vocab_size, (int(k),), generator=generator))
            for k in lengths]


def random_model(shapes: dict, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A random LlamaForCausalLM made on ``device`` in ``dtype``, as lib's LoadedModel with the paper's template."""
    model = random_llama(dict(shapes, pad_token_id=2), device, dtype).requires_grad_(False)
    words = common.word_tokenizer([f"w{i}" for i in range(5, shapes["vocab_size"])])
    info = describe(model, "llama2-7b-shapes", "random", PromptTemplate(PAPER_TEMPLATE, add_special_tokens=True),
                    refusal_tokens=["w5"])
    return LoadedModel(model, prepare_tokenizer(words), info)


def under(context, lm, direction, fn):
    """``fn`` as a callable that runs with ``direction`` ablated by ``context`` (lib's hooks or weight edit)."""
    def run():
        with context(lm, direction):
            return fn()
    return run


def bench_paper_batch(lm, args, device, results: dict) -> None:
    batch = encode(lm, random_prompts(args.batch_prompts, lm.model.config.vocab_size, seed=1))
    direction, n = random_directions(1, lm.info.d_model, 0)[0], args.new_tokens

    def greedy():
        return hf_greedy(lm, batch, n)

    methods = {PLAIN: greedy, HOOKS: under(ablated, lm, direction, greedy),
               ORTHO: under(orthogonalized, lm, direction, greedy)}
    log(f"paper batch: {args.batch_prompts} prompts x {n} tokens")
    # full-length warm-ups: on a GPU every new shape (each cache length) is a first call for the kernel libraries
    times, outputs = common.interleaved(methods, args.repeats, dict(methods), device)
    ratios = {name: paired(times, name, PLAIN) for name in times}
    loop = {"hooks (paired)": methods[HOOKS], LOOP: under(ablated, lm, direction,
                                                          lambda: recompute_greedy(lm, batch, n))}
    loop_times, loop_out = common.interleaved(loop, args.loop_repeats, None, device)  # each run paired with hooks
    times[LOOP], outputs[LOOP], hooks_vs_loop = loop_times[LOOP], loop_out[LOOP], paired(loop_times, *loop)
    ratios[LOOP] = ratios[HOOKS] / hooks_vs_loop
    rows = [{"method": name, "runs": len(s), "s per batch": common.median(s), "vs plain": ratios[name],
             "vs the paper's 20 s": PAPER_BATCH_SECONDS / common.median(s),
             "same tokens as lib hooks": None if name == PLAIN else agreement(outputs[name], outputs[HOOKS])}
            for name, s in times.items()]
    results["paper_batch"] = {"prompts": args.batch_prompts, "new_tokens": n, "rows": rows, "times": times,
                              "hooks_vs_loop": hooks_vs_loop}


def bench_transfer(lm, args, device, results: dict) -> None:
    prompts = random_prompts(args.prompts, lm.model.config.vocab_size, seed=2)
    size = args.batch_size or batching.auto_batch_size(lm, LONGEST, args.new_tokens, device)
    size = batching.balanced(len(prompts), size)
    n_ablated = args.conditions - args.baselines
    directions = random_directions(max(1, n_ablated), lm.info.d_model, 1)
    conditions = [None] * args.baselines + list(range(n_ablated))
    log(f"transfer: {len(conditions)} conditions x {len(prompts)} prompts x {args.new_tokens} tokens, batch {size}")
    runs, peak, start = [], None, time.perf_counter()
    for source in conditions:
        if runs and time.perf_counter() - start > args.budget_s:
            break
        common.sync(device)
        t0 = time.perf_counter()
        if source is None:  # unablated: its peak memory is the generation's alone (no weight copies)
            with common.PeakMemory(device) as memory:
                generate(lm, prompts, args.new_tokens, size)
            peak = max(peak or 0, memory.bytes or 0)
        else:
            with orthogonalized(lm, directions[source]):
                generate(lm, prompts, args.new_tokens, size)
        common.sync(device)
        runs.append(time.perf_counter() - t0)
        log(f"  condition {len(runs)}/{len(conditions)}: {runs[-1]:.1f} s")
    measured, per_condition = time.perf_counter() - start, common.median(runs)
    estimate = size * batching.sequence_bytes(lm, LONGEST, args.new_tokens)
    results["transfer"] = {
        "conditions": len(conditions), "prompts": len(prompts), "new_tokens": args.new_tokens, "batch_size": size,
        "conditions_run": len(runs), "condition_seconds": runs, "measured_s": measured,
        "projected_total_s": measured + (len(conditions) - len(runs)) * per_condition,
        "projected_3x3_s": 9 * per_condition, "speedup_vs_paper_3x3": PAPER_MATRIX_SECONDS / (9 * per_condition),
        "peak_bytes_above_weights": peak, "autobatch_estimate_bytes": estimate,
        "estimate_covers_peak": None if peak is None else bool(estimate * batching.SAFETY >= peak)}


def report(results: dict) -> str:
    m = results["machine"]
    lines = [f"# benchmarks/gpu.sh: random {results['shapes']} model, {results['dtype']}, on "
             f"{m.get('gpu', m['device'])} ({m['date']}, torch {m['torch']}, transformers {m['transformers']})", ""]
    if p := results.get("paper_batch"):
        lines += [f"## The paper's batch: {p['prompts']} prompts x {p['new_tokens']} new tokens", "",
                  common.markdown_table(p["rows"], ["method", "runs", "s per batch", "vs plain", "vs the paper's 20 s",
                                                    "same tokens as lib hooks"]), "",
                  f"lib hooks vs the paper's loop, paired runs: {p['hooks_vs_loop']:.1f}x", ""]
    if t := results.get("transfer"):
        lines += [f"## Transfer workload: {t['conditions']} conditions x {t['prompts']} prompts x {t['new_tokens']} "
                  f"tokens, batch {t['batch_size']}", "",
                  f"- ran {t['conditions_run']} of {t['conditions']} conditions in {t['measured_s']:.0f} s; all of "
                  f"them projected {t['projected_total_s']:.0f} s; the 3x3 matrix {t['projected_3x3_s']:.0f} s, "
                  f"{t['speedup_vs_paper_3x3']:.0f}x the paper's ~1.7 h",
                  f"- peak memory above the weights {common.fmt_bytes(t['peak_bytes_above_weights'])}; estimate "
                  f"{common.fmt_bytes(t['autobatch_estimate_bytes'])} (x{batching.SAFETY} covers the peak: "
                  f"{t['estimate_covers_peak']})", ""]
    return "\n".join(lines + [f"Command: {results['command']}  (wall time {results['wall_s']:.0f} s)"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and counts; runs on the CPU as well")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=None, help="default: lib.batching.auto_batch_size")
    # --conditions of the transfer workload, --baselines of them unablated; --batch-prompts: the paper's batch
    for flag, default in (("--conditions", 12), ("--baselines", 3), ("--prompts", 520), ("--new-tokens", 64),
                          ("--batch-prompts", 16), ("--repeats", 5), ("--loop-repeats", 2)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--budget-s", type=float, default=180.0, help="transfer: start no condition after this")
    parser.add_argument("--sections", default="paper_batch,transfer")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("REFUSAL_BOOK_PROGRESS", "0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("No CUDA device: benchmarks.gpu_bench needs a GPU (or --smoke for a tiny CPU run).")
    if args.smoke:
        args.prompts, args.conditions, args.baselines = min(args.prompts, 24), min(args.conditions, 3), 1
        args.new_tokens, args.batch_prompts, args.repeats, args.loop_repeats = 8, 4, 1, 1
        args.budget_s = min(args.budget_s, 30.0)
        args.dtype = "float32" if device.type == "cpu" else args.dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(common.idle_threads() if device.type == "cpu" else threads)
    try:
        return _main(args, argv, device)
    finally:
        torch.set_num_threads(threads)


def _main(args, argv, device) -> dict:
    wall = time.perf_counter()
    dtype = resolve_dtype(args.dtype, device)
    lm = random_model(SMOKE if args.smoke else LLAMA2_7B, device, dtype)
    log(f"random model, {sum(p.numel() for p in lm.model.parameters()) / 1e9:.2f} B parameters, on {device}")
    results = {"shapes": "tiny (--smoke)" if args.smoke else "Llama-2-7B-shaped", "dtype": str(dtype)[6:],
               "machine": common.machine(device), "args": vars(args),
               "command": "python -m benchmarks.gpu_bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    sections = args.sections.split(",")
    for section, bench in (("paper_batch", bench_paper_batch), ("transfer", bench_transfer)):
        if section in sections:
            bench(lm, args, device, results)
    results["wall_s"] = time.perf_counter() - wall
    text = report(results)
    print(text)
    stem = f"gpu-{results['machine']['date']}-{'smoke' if args.smoke else 'llama2-7b-shapes'}-{device.type}"
    common.write_results(results, text, stem, args.out)
    return results


if __name__ == "__main__":
    main()
