"""The paper-scale workload on a GPU without weights or network: a randomly initialised model with Llama-2-7B's
shapes (32 layers, d_model 4096, 32 heads, FFN 11008, vocabulary 32000) in bfloat16.

1. generation at the paper's batch (16 prompts x 64 new tokens): plain ``generate`` | lib hooks + KV cache |
   lib orthogonalised weights | lib's previous hooks (before/after) | the paper's loop (whole prefix every token, no KV cache), against the paper's
   ~20 s per batch of 16 (TransformerLens, 4-bit, a ~48 GB GPU).
   A torch.profiler table of plain generation and generation under hooks (host time by operator), and hooks
   against the paper's loop once more at the transfer batch, where the GPU has enough work for recomputation to cost.
2. the transfer workload: ``--conditions`` (12: the 3x3 matrix plus 3 unablated baselines) x ``--prompts`` (520) x
   ``--new-tokens`` (64) through ``lib.generation.generate`` with all-layer ablation by orthogonalised weights, batch
   from ``lib.runtime.auto_batch_size``; within ``--budget-s`` whole conditions run and the rest is projected. Compared with
   the paper's ~1.7 h for the 3x3 matrix (9 x ~11 min).

Prompts are random words of a synthetic word-level tokenizer (the vocabulary is 32000 words, so every id is used),
12 to 32 words long like AdvBench's goals, in the paper's template. Weights are random, so completions are
meaningless and rarely end early: every condition generates (almost) all its tokens, the worst case for time.
``--smoke`` runs the same code with tiny shapes, on the CPU if there is no GPU.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

from benchmarks import common
from lib import runtime
from benchmarks.run import agreement, hf_greedy, paired, random_directions, recompute_greedy

PAPER_TEMPLATE = "\n[INST]{prompt}[/INST]\n"
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512, rms_norm_eps=1e-5)
PAPER_BATCH_SECONDS = 20.0  # the paper: ~20 s per batch of 16 prompts x 64 tokens
LIB_AT_SCALE, LOOP_AT_SCALE = "lib hooks + KV cache", "paper's loop (lib hooks)"
PREVIOUS_HOOKS = "lib hooks before 2026-11-27 (every block input; 3 kernels a hook) + KV cache"
PAPER_MATRIX_SECONDS = 9 * 11 * 60  # the paper: ~11 min per (model, layer) x 9 cells = ~1.7 h


log = common.log


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose ids 5..vocab_size-1 are the words w5, w6, ...; specials as Llama-2's."""
    return common.word_tokenizer([f"w{i}" for i in range(5, vocab_size)])


def random_prompts(n: int, vocab_size: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 33, (n,), generator=generator)
    return [" ".join(f"w{int(i)}" for i in torch.randint(5, vocab_size, (int(k),), generator=generator))
            for k in lengths]


def random_model(shapes: dict, device: torch.device, dtype: torch.dtype):
    """A LlamaForCausalLM with random weights, made directly on ``device`` in ``dtype``, wrapped as lib's
    LoadedModel (family "llama2-7b-shapes", the paper's template)."""
    from benchmarks.standin import random_llama
    from lib.models import LoadedModel, PromptTemplate, describe, prepare_tokenizer

    model = random_llama(dict(shapes, pad_token_id=2), device, dtype).requires_grad_(False)
    tokenizer = prepare_tokenizer(word_tokenizer(shapes["vocab_size"]))
    info = describe(model, "llama2-7b-shapes", "random", PromptTemplate(PAPER_TEMPLATE, add_special_tokens=True),
                    refusal_tokens=["w5"])
    return LoadedModel(model, tokenizer, info)


def bench_paper_batch(lm, args, device, results: dict) -> None:
    from lib.ablation import orthogonalized
    from lib.inputs import encode

    prompts = random_prompts(args.batch_prompts, lm.model.config.vocab_size, seed=1)
    batch = encode(lm, prompts)
    direction = random_directions(1, lm.info.d_model, 0)[0]
    n = args.new_tokens

    hooks = functools.partial(under_hooks, lm, direction)

    def ortho(fn):
        def run():
            with orthogonalized(lm, direction):
                return fn()
        return run

    methods = {"plain generate, no ablation (the limit)": lambda: hf_greedy(lm, batch, n),
               "lib hooks + KV cache": hooks(lambda: hf_greedy(lm, batch, n)),
               "lib orthogonalised weights + KV cache (incl. the weight edit)": ortho(lambda: hf_greedy(lm, batch, n)),
               PREVIOUS_HOOKS: under_previous_hooks(lm, direction, lambda: hf_greedy(lm, batch, n))}
    # Full-length warm-ups: on a GPU every new shape (each cache length) is a first call for the kernel libraries.
    warmups = {"plain": lambda: hf_greedy(lm, batch, n), "hooks": hooks(lambda: hf_greedy(lm, batch, n)),
               "ortho": ortho(lambda: hf_greedy(lm, batch, n)),
               "previous hooks": under_previous_hooks(lm, direction, lambda: hf_greedy(lm, batch, n))}
    log(f"paper batch: {len(prompts)} prompts x {n} tokens (prompt width {batch['input_ids'].shape[1]})")
    times, outputs = common.interleaved(methods, args.repeats, warmups, device, log)
    plain_name, hooks_name = "plain generate, no ablation (the limit)", "lib hooks + KV cache"
    ratios = {name: paired(times, name, plain_name) for name in times}
    loop = "paper's loop: full prefix every token, no KV cache (lib hooks)"
    loop_times, loop_out = common.interleaved(  # each run of the loop paired with a run of lib hooks
        {"hooks (paired)": methods[hooks_name], loop: hooks(lambda: recompute_greedy(lm, batch, n))},
        args.loop_repeats, {"loop": hooks(lambda: recompute_greedy(lm, batch, n))}, device, log)
    times[loop] = loop_times[loop]
    outputs[loop] = loop_out[loop]
    hooks_vs_loop = paired(loop_times, "hooks (paired)", loop)
    ratios[loop] = ratios[hooks_name] / hooks_vs_loop
    reference = outputs[hooks_name]
    tokens = len(prompts) * n
    rows = []
    for name, seconds in times.items():
        rows.append({"method": name, "runs": len(seconds), "s per batch": common.median(seconds),
                     "new tokens/s": tokens / common.median(seconds), "vs plain": ratios[name],
                     "vs the paper's 20 s": PAPER_BATCH_SECONDS / common.median(seconds),
                     "same tokens as lib hooks": None if name == plain_name
                     else agreement(outputs[name].cpu(), reference.cpu())})
    results["paper_batch"] = {"prompts": len(prompts), "new_tokens": n, "rows": rows, "times": times,
                              "hooks_vs_loop": hooks_vs_loop}
    if "profile" in args.sections.split(","):
        results["profile"] = profile_hooks(lm, batch, min(n, 16), direction, device)


def profile_hooks(lm, batch, n: int, direction, device, top: int = 15) -> str:
    """torch.profiler over plain generation and generation under lib hooks (``n`` new tokens each): the operators
    that take the most host time, so the cost of the hooks shows by name."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = []
    for name, run in [("plain generate", lambda: hf_greedy(lm, batch, n)),
                      ("lib hooks", under_hooks(lm, direction, lambda: hf_greedy(lm, batch, n)))]:
        run()
        with profile(activities=activities) as prof:
            run()
            common.sync(device)
        tables.append(f"### {name}, {n} new tokens\n\n```\n"
                      + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top) + "\n```")
    return "\n\n".join(tables)


def under_hooks(lm, direction, fn):
    """``fn`` as a callable that runs with ``direction`` ablated by lib hooks."""
    from lib.ablation import ablated

    def run():
        with ablated(lm, direction):
            return fn()
    return run


def under_previous_hooks(lm, direction, fn):
    """``fn`` under lib's hooks as they were before 2026-11-27, kept here for a side-by-side before/after: a hook on
    every block input, attention output and MLP output (96 for 32 layers), each ``x - (x B^T) B`` in three kernels
    (``lib.ablation.project_out``). Now: block inputs only where a run of ablated layers starts, two kernels."""
    from lib.ablation import check_directions, project_out
    from lib.hooks import attached, input_hook, output_hook

    basis = check_directions(direction, lm.info.d_model)
    cast: dict[tuple, torch.Tensor] = {}

    def project(hidden):
        key = (hidden.device, hidden.dtype)
        if key not in cast:
            cast[key] = basis.to(device=hidden.device, dtype=hidden.dtype)
        return project_out(hidden, cast[key])

    hooks = [hook for layer in range(lm.info.n_layers) for hook in (
        (lm.info.layers[layer], "pre", input_hook(project)),
        (lm.info.submodule(layer, "attn"), "post", output_hook(project)),
        (lm.info.submodule(layer, "mlp"), "post", output_hook(project)))]

    def run():
        with attached(hooks):
            return fn()
    return run


def bench_loop_at_scale(lm, args, device, results: dict) -> None:
    """lib hooks + KV cache against the paper's loop at the large batch the transfer workload uses: at the paper's
    batch of 16 a GPU waits on kernel launches whichever loop runs, so the cost of recomputing the prefix shows only
    when the GPU has work to do."""
    from lib.inputs import encode

    n = args.new_tokens
    probe = random_prompts(64, lm.model.config.vocab_size, seed=3)
    longest = max(max(encode(lm, [p]).input_ids.shape[1] for p in probe), 3 + 32 + 4)
    size = args.batch_size or min(runtime.auto_batch_size(lm, longest, n, device),
                                  runtime.auto_batch_size(lm, longest, n, device, kv_cache=False))
    batch = encode(lm, random_prompts(size, lm.model.config.vocab_size, seed=3))
    direction = random_directions(1, lm.info.d_model, 0)[0]

    hooks = functools.partial(under_hooks, lm, direction)
    log(f"loop at scale: {size} prompts x {n} tokens (prompt width {batch['input_ids'].shape[1]})")
    times, outputs = common.interleaved(
        {LIB_AT_SCALE: hooks(lambda: hf_greedy(lm, batch, n)), LOOP_AT_SCALE: hooks(lambda: recompute_greedy(lm, batch, n))},
        1, {"hooks": hooks(lambda: hf_greedy(lm, batch, n))}, device, log)
    results["loop_at_scale"] = {"prompts": size, "new_tokens": n, "times": times,
                                "hooks_vs_loop": paired(times, LIB_AT_SCALE, LOOP_AT_SCALE)}


def bench_transfer(lm, args, device, results: dict) -> None:
    from lib.ablation import orthogonalized
    from lib.generation import generate
    from lib.inputs import encode

    prompts = random_prompts(args.prompts, lm.model.config.vocab_size, seed=2)
    longest = max(encode(lm, [p]).input_ids.shape[1] for p in prompts[:64])
    longest = max(longest, 3 + 32 + 4)  # the longest prompt the generator can draw, templated
    batch_size = args.batch_size or runtime.auto_batch_size(lm, longest, args.new_tokens, device)
    batch_size = runtime.balanced(len(prompts), batch_size)
    n_ablated = args.conditions - args.baselines
    directions = random_directions(max(1, n_ablated), lm.info.d_model, 1)
    conditions = [None] * args.baselines + list(range(n_ablated))
    log(f"transfer: {len(conditions)} conditions ({args.baselines} unablated) x {len(prompts)} prompts x "
        f"{args.new_tokens} tokens, batch {batch_size}, budget {args.budget_s:.0f} s")
    runs, ended = [], []
    start = time.perf_counter()
    peak = None
    for index, source in enumerate(conditions):
        if runs and time.perf_counter() - start > args.budget_s:
            break
        common.sync(device)
        t0 = time.perf_counter()
        if source is None:  # unablated: its peak memory is the generation's alone (no weight copies)
            with common.PeakMemory(device) as memory:
                _, finished = generate(lm, prompts, args.new_tokens, batch_size, with_finished=True)
            peak = memory.bytes if peak is None else max(peak, memory.bytes or 0)
        else:
            with orthogonalized(lm, directions[source]):
                _, finished = generate(lm, prompts, args.new_tokens, batch_size, with_finished=True)
        common.sync(device)
        runs.append(time.perf_counter() - t0)
        ended.append(sum(finished))
        log(f"  condition {index + 1}/{len(conditions)} ({'unablated' if source is None else 'ablated'}): "
            f"{runs[-1]:.1f} s, {ended[-1]} of {len(prompts)} ended before {args.new_tokens} tokens")
    measured = time.perf_counter() - start
    per_condition = common.median(runs)
    projected = measured + (len(conditions) - len(runs)) * per_condition
    estimate = batch_size * runtime.sequence_bytes(lm, longest, args.new_tokens)
    results["transfer"] = {
        "conditions": len(conditions), "baselines": args.baselines, "prompts": len(prompts),
        "new_tokens": args.new_tokens, "batch_size": batch_size, "conditions_run": len(runs),
        "condition_seconds": runs, "measured_s": measured, "projected_total_s": projected,
        "projected_3x3_s": 9 * per_condition, "paper_3x3_s": PAPER_MATRIX_SECONDS,
        "speedup_vs_paper_3x3": PAPER_MATRIX_SECONDS / (9 * per_condition),
        "peak_bytes_above_weights": peak, "autobatch_estimate_bytes": estimate,
        "estimate_covers_peak": None if peak is None else bool(estimate * runtime.SAFETY >= peak)}


def report(results: dict) -> str:
    m = results["machine"]
    lines = [f"# benchmarks/gpu.sh: random {results['shapes']} model, {results['dtype']}, on "
             f"{m.get('gpu', m['device'])} ({m['date']}, torch {m['torch']}, transformers {m['transformers']})", ""]
    if "paper_batch" in results:
        p = results["paper_batch"]
        lines += [f"## The paper's batch: {p['prompts']} prompts x {p['new_tokens']} new tokens", "",
                  common.markdown_table(p["rows"], ["method", "runs", "s per batch", "new tokens/s", "vs plain",
                                                    "vs the paper's 20 s", "same tokens as lib hooks"]), "",
                  f"lib hooks + KV cache vs the paper's loop, paired runs: {p['hooks_vs_loop']:.1f}x", ""]
    if "loop_at_scale" in results:
        q = results["loop_at_scale"]
        lib_s, loop_s = (common.median(q["times"][name]) for name in (LIB_AT_SCALE, LOOP_AT_SCALE))
        lines += [f"## lib hooks + KV cache against the paper's loop at {q['prompts']} prompts x {q['new_tokens']} "
                  "tokens (the transfer batch)", "",
                  f"- lib hooks + KV cache {lib_s:.2f} s, the paper's loop {loop_s:.2f} s: {q['hooks_vs_loop']:.1f}x", ""]
    if "transfer" in results:
        t = results["transfer"]
        lines += [f"## Transfer workload: {t['conditions']} conditions x {t['prompts']} prompts x {t['new_tokens']} "
                  f"tokens, batch {t['batch_size']}", "",
                  f"- ran {t['conditions_run']} of {t['conditions']} conditions in {t['measured_s']:.0f} s "
                  f"(median {common.median(t['condition_seconds']):.1f} s per condition)",
                  f"- projected wall time for all {t['conditions']}: {t['projected_total_s']:.0f} s "
                  f"({t['projected_total_s'] / 60:.1f} min); for the 3x3 matrix alone {t['projected_3x3_s']:.0f} s "
                  f"against the paper's ~{t['paper_3x3_s'] / 3600:.2f} h: {t['speedup_vs_paper_3x3']:.0f}x faster",
                  f"- peak memory above the weights (unablated condition) "
                  f"{common.fmt_bytes(t['peak_bytes_above_weights'])}; autobatch "
                  f"estimate for the batch {common.fmt_bytes(t['autobatch_estimate_bytes'])} (x{runtime.SAFETY} "
                  f"margin covers the peak: {t['estimate_covers_peak']})", ""]
    if "profile" in results:
        lines += ["## Profile: plain generation and generation under lib hooks", "", results["profile"], ""]
    lines.append(f"Command: {results['command']}  (wall time {results['wall_s']:.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and counts; runs on the CPU as well")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--conditions", type=int, default=12)
    parser.add_argument("--baselines", type=int, default=3, help="conditions without ablation")
    parser.add_argument("--prompts", type=int, default=520)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="default: lib.runtime.auto_batch_size")
    parser.add_argument("--batch-prompts", type=int, default=16, help="the paper's batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=180.0, help="transfer: start no condition after this")
    parser.add_argument("--sections", default="paper_batch,profile,loop_at_scale,transfer")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("REFUSAL_BOOK_PROGRESS", "0")
    device = common.bench_device(args.smoke, "benchmarks.gpu_bench")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        from benchmarks.run import idle_threads

        torch.set_num_threads(idle_threads())
    try:
        return _main(args, argv, device)
    finally:
        torch.set_num_threads(threads)


def _main(args, argv, device) -> dict:
    wall = time.perf_counter()
    from lib.runtime import resolve_dtype

    if args.smoke:
        args.prompts, args.conditions, args.baselines = min(args.prompts, 24), min(args.conditions, 3), 1
        args.new_tokens, args.batch_prompts, args.repeats, args.loop_repeats = 8, 4, 1, 1
        args.budget_s = min(args.budget_s, 30.0)
        if device.type == "cpu":
            args.dtype = "float32"
    dtype = resolve_dtype(args.dtype, device)
    shapes = SMOKE if args.smoke else LLAMA2_7B
    t0 = time.perf_counter()
    lm = random_model(shapes, device, dtype)
    log(f"random model ({sum(p.numel() for p in lm.model.parameters()) / 1e9:.2f} B parameters) on {device} in "
        f"{time.perf_counter() - t0:.1f} s")
    results = {"shapes": "tiny (--smoke)" if args.smoke else "Llama-2-7B-shaped", "dtype": str(dtype).replace(
        "torch.", ""), "machine": common.machine(device), "args": vars(args),
        "command": "python -m benchmarks.gpu_bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    sections = args.sections.split(",")
    if "paper_batch" in sections:
        bench_paper_batch(lm, args, device, results)
    if "loop_at_scale" in sections:
        bench_loop_at_scale(lm, args, device, results)
    if "transfer" in sections:
        bench_transfer(lm, args, device, results)
    results["wall_s"] = time.perf_counter() - wall
    text = report(results)
    print(text)
    common.write_results(results, text, f"gpu-{results['machine']['date']}-{'smoke' if args.smoke else 'llama2-7b-shapes'}-{device.type}", args.out)
    return results


if __name__ == "__main__":
    main()
