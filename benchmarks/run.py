"""`make bench`: throughput of refusal-direction ablation and residual capture, lib against its limits and peers.

One run, one model, the same prompts and token counts for every method:

1. generation: greedy, exactly ``--new-tokens`` new tokens per prompt (no stop at end-of-turn, so every method does
   the same work), all-layer all-site ablation of a random unit direction:
   plain ``generate`` without ablation (the limit) | lib hooks + KV cache | lib orthogonalised weights + KV cache |
   the paper's loop (the whole prefix re-run for every token, no KV cache; here with lib hooks) |
   TransformerLens hooks + KV cache (resid_pre/mid/post of every layer, as in the paper's code).
2. capture: resid_pre of every layer at the last prompt token for ``--capture-prompts`` prompts:
   a bare forward pass (no capture) | lib.capture.collect | HF ``output_hidden_states=True`` |
   TransformerLens ``run_with_cache`` -- tokens/s and peak memory.
3. transfer: the transfer-matrix workload of the default profile end to end (load each target variant, then for each
   source direction: ablate, ``lib.generation.generate``, judge): ``--transfer-conditions`` x ``--transfer-prompts``
   x ``--transfer-tokens``. Within ``--transfer-budget-s`` (0: no limit) it runs whole conditions and projects the
   rest from their mean.

Throughputs are medians over ``--repeats`` interleaved rounds after one warm-up per method; ratios are medians of
the ratios within each round (paired, so that a change in a shared machine's load between rounds cancels out). The
paper's loop is slow: each of its ``--recompute-repeats`` runs is paired with a run of lib hooks just before it.
Tables go to stdout (progress to stderr) and, with everything measured, to ``artifacts/benchmarks/``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from unittest import mock

import torch

from benchmarks import common
from lib import runtime
from lib.lanes import available_cores

PROFILE_TARGETS = ("ssft", "ssft-control", "at", "lat")


def idle_threads() -> int:
    """Threads for torch: the cores not busy with other processes (1-minute load average), within 1..default."""
    cores = available_cores()
    return max(1, min(torch.get_num_threads(), cores - int(round(os.getloadavg()[0]))))


log = common.log


# --- generation methods ------------------------------------------------------------------------------------------

def greedy_config(lm, max_new_tokens: int):
    from transformers import GenerationConfig

    # eos_token_id=[]: never stop early (an empty list is not replaced by the model's default, None would be)
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[],
                            pad_token_id=lm.tokenizer.pad_token_id)


def hf_greedy(lm, batch, max_new_tokens: int) -> torch.Tensor:
    """HF ``generate`` with its KV cache: new tokens [batch, max_new_tokens]."""
    with torch.inference_mode():
        out = lm.model.generate(**batch, generation_config=greedy_config(lm, max_new_tokens))
    return out[:, batch["input_ids"].shape[1]:]


def recompute_greedy(lm, batch, max_new_tokens: int) -> torch.Tensor:
    """The paper's loop: at every step a full forward pass over prompt + tokens so far (no KV cache, logits at every
    position, as TransformerLens computes them), then the argmax of the last position."""
    from lib.inputs import position_ids

    ids, mask = batch["input_ids"], batch["attention_mask"]
    one = torch.ones_like(mask[:, :1])
    new = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                              use_cache=False).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, one], 1)
            new.append(token)
    return torch.cat(new, 1)


def run_batches(fn, batches) -> torch.Tensor:
    return torch.cat([fn(batch).cpu() for batch in batches], 0)


def test_prompts(n: int) -> list[str]:
    from lib.data import split

    pool = [pair.harmful for pair in split("test", 42)]
    return [pool[i % len(pool)] for i in range(n)]


def encode_batches(lm, prompts, batch_size):
    from lib.capture import order_by_length
    from lib.inputs import encode

    order = order_by_length(lm, prompts)
    return [encode(lm, [prompts[i] for i in order[i:i + batch_size]]) for i in range(0, len(order), batch_size)]


def random_directions(k: int, d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(k, d, generator=generator)
    return directions / directions.norm(dim=1, keepdim=True)


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of sequences whose greedy tokens equal the reference's exactly."""
    return float((tokens == reference).all(dim=1).float().mean())


def bench_generation(lm, args, peer, device, results: dict) -> None:
    from lib.ablation import ablated, check_directions, orthogonalized

    prompts = test_prompts(args.prompts)
    n_new = args.new_tokens
    longest = max(b["input_ids"].shape[1] for b in encode_batches(lm, prompts, len(prompts)))
    batch_size = args.batch_size or min(len(prompts),
                                        runtime.auto_batch_size(lm, longest, n_new, device, kv_cache=False))
    batch_size = runtime.balanced(len(prompts), batch_size)
    batches = encode_batches(lm, prompts, batch_size)
    direction = random_directions(1, lm.info.d_model, args.seed)[0]
    basis = check_directions(direction, lm.info.d_model)
    log(f"generation: {len(prompts)} prompts in batches of {batch_size} (longest prompt {longest} tokens), "
        f"{n_new} new tokens")
    setup_seconds: list[float] = []

    def with_hooks(fn):
        def run():
            with ablated(lm, direction):
                return fn()
        return run

    def with_orthogonalised(fn):
        def run():
            t0 = time.perf_counter()
            with orthogonalized(lm, direction):
                t1 = time.perf_counter()
                out = fn()
                t2 = time.perf_counter()
            setup_seconds.append((t1 - t0) + (time.perf_counter() - t2))  # edit the weights, restore them
            return out
        return run

    def plain(n):
        return lambda: run_batches(lambda b: hf_greedy(lm, b, n), batches)

    methods = {"plain generate, no ablation (the limit)": plain(n_new),
               "lib hooks + KV cache": with_hooks(plain(n_new)),
               "lib orthogonalised weights + KV cache": with_orthogonalised(plain(n_new))}
    warm = min(n_new, 8)
    warmups = {"plain": plain(warm), "hooks": with_hooks(plain(warm)), "ortho": with_orthogonalised(plain(warm))}
    if peer is not None:
        name = f"{peer.name} hooks + KV cache"
        methods[name] = lambda: run_batches(lambda b: peer.generate(b, n_new, basis), batches)
        warmups["peer"] = lambda: run_batches(lambda b: peer.generate(b, warm, basis), batches[:1])
    times, outputs = common.interleaved(methods, args.repeats, warmups, device, log)
    ortho_setup = common.median(setup_seconds)
    # the orthogonalised rows time generation only; the one-off weight edit per condition is reported apart
    ortho_name = "lib orthogonalised weights + KV cache"
    times[ortho_name] = [t - s for t, s in zip(times[ortho_name], setup_seconds[-args.repeats:])]
    plain_name, hooks_name = "plain generate, no ablation (the limit)", "lib hooks + KV cache"
    ratios = {name: paired(times, name, plain_name) for name in times}
    recompute_name = "paper's loop: full prefix every token, no KV cache (lib hooks)"
    hooks_vs_loop = None
    if args.recompute_repeats > 0:
        # each run of the loop is paired with a run of lib hooks + KV cache just before it (same machine state)
        r_times, r_out = common.interleaved(
            {"hooks (paired)": methods[hooks_name],
             recompute_name: with_hooks(lambda: run_batches(lambda b: recompute_greedy(lm, b, n_new), batches))},
            args.recompute_repeats, None, device, log)
        times[recompute_name] = r_times[recompute_name]
        outputs[recompute_name] = r_out[recompute_name]
        hooks_vs_loop = paired(r_times, "hooks (paired)", recompute_name)
        ratios[recompute_name] = ratios[hooks_name] / hooks_vs_loop
    tokens = len(prompts) * n_new
    reference = outputs[hooks_name]
    rows = []
    for name, seconds in times.items():
        rows.append({"method": name, "runs": len(seconds), "median s": common.median(seconds),
                     "new tokens/s": tokens / common.median(seconds), "vs plain": ratios[name],
                     "same tokens as lib hooks": agreement(outputs[name], reference) if name != plain_name else None})
    results["generation"] = {"prompts": len(prompts), "batch_size": batch_size, "new_tokens": n_new,
                             "longest_prompt_tokens": longest, "orthogonalisation_setup_s": ortho_setup,
                             "ablation_changes_tokens": agreement(outputs[plain_name], reference) < 1.0,
                             "hooks_vs_loop": hooks_vs_loop, "rows": rows, "times": times}


def paired(times: dict[str, list[float]], method: str, reference: str) -> float:
    """Throughput of ``method`` relative to ``reference``: the median over rounds of the ratio within each round (a
    round runs both back to back, so a change in the machine's load between rounds cancels out)."""
    return common.median([r / m for m, r in zip(times[method], times[reference])])


# --- capture -----------------------------------------------------------------------------------------------------

def bench_capture(lm, args, peer, device, results: dict) -> None:
    from lib.capture import collect
    from lib.hooks import check_layers
    from lib.inputs import forward

    prompts = test_prompts(args.capture_prompts)
    layers = check_layers(lm.info, None)
    longest = max(b["input_ids"].shape[1] for b in encode_batches(lm, prompts, len(prompts)))
    batch_size = args.batch_size or min(len(prompts), runtime.auto_batch_size(lm, longest, 0, device))
    batch_size = runtime.balanced(len(prompts), batch_size)
    batches = encode_batches(lm, prompts, batch_size)  # only to count tokens; every method encodes its own
    real_tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    padded_tokens = int(sum(b["attention_mask"].numel() for b in batches))
    log(f"capture: {len(prompts)} prompts ({real_tokens} tokens) in batches of {batch_size}, {len(layers)} layers")
    n, n_layers, d = len(prompts), len(layers), lm.info.d_model

    def per_batch(fn, texts):
        from lib.capture import order_by_length
        from lib.inputs import encode

        def run():
            order = order_by_length(lm, texts)
            out = torch.zeros(len(texts), n_layers, d)
            with torch.inference_mode():
                for i in range(0, len(texts), batch_size):
                    rows = order[i:i + batch_size]
                    value = fn(encode(lm, [texts[r] for r in rows]))
                    if value is not None:
                        out[rows] = value
            return out
        return run

    def hidden_states(batch):
        states = forward(lm, batch, output_hidden_states=True).hidden_states
        return torch.stack([states[layer][:, -1] for layer in layers], 1).float().cpu()

    def make_methods(texts):
        methods = {"bare forward pass (no capture)": per_batch(lambda b: (forward(lm, b), None)[1], texts),
                   "lib.capture.collect": lambda: collect(lm, texts, layers=layers, sites=("resid_pre",),
                                                          positions=-1, batch_size=batch_size)["resid_pre"],
                   "HF output_hidden_states=True": per_batch(hidden_states, texts)}
        if peer is not None:
            methods[f"{peer.name} run_with_cache"] = per_batch(lambda b: peer.capture_last(b, layers), texts)
        return methods

    methods, warmups = make_methods(prompts), make_methods(prompts[:2])
    peaks, outputs = {}, {}
    for name, fn in methods.items():  # a short warm-up, then the peak-memory run of each method on its own
        warmups[name]()
        with common.PeakMemory(device) as peak:
            outputs[name] = fn()
        peaks[name] = peak.bytes
        log(f"  peak memory {name}: {common.fmt_bytes(peak.bytes)}")
    times, _ = common.interleaved(methods, args.capture_repeats, None, device, log)
    reference = outputs["lib.capture.collect"]
    retained = n * n_layers * d * 4
    rows = []
    for name, seconds in times.items():
        rate = real_tokens / common.median(seconds)
        rows.append({"method": name, "runs": len(seconds), "median s": common.median(seconds), "tokens/s": rate,
                     "vs bare forward": paired(times, name, "bare forward pass (no capture)"),
                     "peak memory": common.fmt_bytes(peaks[name]),
                     "peak bytes": peaks[name], "kept": "-" if name.startswith("bare") else common.fmt_bytes(retained),
                     "max |diff| vs lib": None if name.startswith("bare")
                     else float((outputs[name] - reference).abs().max())})
    results["capture"] = {"prompts": n, "layers": n_layers, "batch_size": batch_size, "real_tokens": real_tokens,
                          "padded_tokens": padded_tokens, "kept_bytes": retained,
                          "all_positions_bytes": real_tokens * n_layers * d * 4, "rows": rows, "times": times}


# --- scoring -----------------------------------------------------------------------------------------------------

SCORE_REFERENCE = "whole prompts, left-padded, in prompt order"
SCORE_LIB = "lib.scores.next_token_log_probs (shared prefix, batched by length)"
SCORE_ROW_BY_ROW = "lib.scores.next_token_log_probs, output layer row by row (int logits_to_keep: lib before 2026-12-02)"


def output_layer_row_by_row() -> contextlib.ExitStack:
    """lib as it was before 2026-12-02: the last position's logits asked for by ``logits_to_keep=1``, which slices a
    strided view that torch runs through the output layer one row at a time (``lib.inputs.LAST_POSITION``)."""
    from lib import capture, generation, inputs, scores

    stack = contextlib.ExitStack()
    for module in (capture, generation, inputs, scores):
        stack.enter_context(mock.patch.object(module, "LAST_POSITION", 1))
    return stack


def bench_scoring(lm, args, device, results: dict) -> None:
    """The generation-free refusal score's forward passes (every layer sweep, score matrix and anatomy condition):
    lib's shared-prefix passes against whole-prompt passes, same prompts, same batch size."""
    from lib.scores import next_token_log_probs
    from lib.inputs import LAST_POSITION, encode, forward, split_common_prefix

    prompts = test_prompts(args.score_prompts)
    prefix, _ = split_common_prefix(lm, prompts)
    log(f"scoring: {len(prompts)} prompts in batches of {args.score_batch}, shared prefix {len(prefix)} tokens")

    def whole(texts):
        def run():
            rows = []
            with torch.inference_mode():
                for i in range(0, len(texts), args.score_batch):
                    batch = encode(lm, texts[i:i + args.score_batch])
                    logits = forward(lm, batch, logits_to_keep=LAST_POSITION).logits[:, -1]
                    rows.append(torch.log_softmax(logits.double(), dim=-1).cpu())
            return torch.cat(rows)
        return run

    def methods(texts):
        def before():
            with output_layer_row_by_row():
                return next_token_log_probs(lm, texts, args.score_batch)
        return {SCORE_REFERENCE: whole(texts), SCORE_LIB: lambda: next_token_log_probs(lm, texts, args.score_batch),
                SCORE_ROW_BY_ROW: before}

    times, outputs = common.interleaved(methods(prompts), args.repeats, methods(prompts[:2]), device, log)
    rows = [{"method": name, "runs": len(seconds), "median s": common.median(seconds),
             "prompts/s": len(prompts) / common.median(seconds), "vs whole prompts": paired(times, name, SCORE_REFERENCE),
             "max |diff| of log-probs": float((outputs[name] - outputs[SCORE_REFERENCE]).abs().max())}
            for name, seconds in times.items()]
    results["scoring"] = {"prompts": len(prompts), "batch_size": args.score_batch, "prefix_tokens": len(prefix),
                          "rows": rows, "times": times}


# --- levers for lib's generation (issue 22) -----------------------------------------------------------------------

GENERATE_LIB = "lib generate (default: weights packed for oneDNN on a float32 CPU)"
GENERATE_MKL = "lib generate, MKL products (REFUSAL_BOOK_PACKED_LINEAR=0: lib of commit c1925c9)"
GENERATE_KEEPING = ("transformers generate, keeping finished rows, MKL products (lib before 2026-12-01; "
                    "benchmarks/finished_rows.py)")
GENERATE_BF16 = "lib generate, bfloat16 weights (changes the numbers; off in the book)"
GENERATE_ROW_BY_ROW = "lib generate, MKL products, output layer row by row after the prompt (lib before 2026-12-02)"


def bench_levers(args, device, results: dict) -> None:
    """One condition of the default transfer workload (the first profile target, a random direction
    orthogonalised, ``--transfer-prompts`` harmful test prompts x ``--transfer-tokens`` tokens, end-of-turn
    stopping as in the book) generated by lib's ``generate`` as it is and with each speed lever switched on,
    interleaved; every lever's completions and keyword-judge labels are compared with the default's. On a CPU in
    float32, one lever that changes the numbers runs too: the same model in bfloat16 (native on CPUs with AVX512-BF16
    or AMX, emulated and slow elsewhere)."""
    from benchmarks.finished_rows import generate_keeping_finished_rows
    from lib.ablation import orthogonalized
    from lib.generation import generate
    from lib.judges import judge_all
    from lib.models import load

    target = (args.transfer_targets.split(",") if args.transfer_targets else default_targets(args.family))[0]
    lm = load(args.family, target, device=args.device, dtype=args.dtype)
    direction = random_directions(1, lm.info.d_model, args.seed + 1)[0]
    prompts = test_prompts(args.transfer_prompts)
    batch_size = args.transfer_batch or runtime.auto_batch_size(lm, 128, args.transfer_tokens, device)
    log(f"levers: {target}, {len(prompts)} prompts x {args.transfer_tokens} tokens, batch {batch_size}")

    def run(packed: bool, generator=generate, model=lm, before=contextlib.nullcontext):
        def go():
            with mock.patch.dict(os.environ, {runtime.PACKED_ENV: "1" if packed else "0"}), \
                    orthogonalized(model, direction), before():
                return generator(model, prompts, args.transfer_tokens, batch_size)
        return go

    methods = {GENERATE_LIB: run(True), GENERATE_MKL: run(False),
               GENERATE_ROW_BY_ROW: run(False, before=output_layer_row_by_row),
               GENERATE_KEEPING: run(False, generate_keeping_finished_rows)}
    if device.type == "cpu" and lm.info.dtype == torch.float32:
        methods[GENERATE_BF16] = run(True, model=load(args.family, target, device=args.device, dtype="bfloat16"))
    times, outputs = common.interleaved(methods, args.repeats, None, device, log)
    labels = {name: judge_all(texts) for name, texts in outputs.items()}

    def same(name: str, values: dict) -> str:
        return f"{sum(a == b for a, b in zip(values[name], values[GENERATE_LIB]))}/{len(prompts)}"

    rows = [{"method": name, "runs": len(seconds), "median s": common.median(seconds),
             "vs lib generate": paired(times, name, GENERATE_LIB), "same completions": same(name, outputs),
             "same judge labels": same(name, labels)}
            for name, seconds in times.items()]
    results["levers"] = {"target": target, "prompts": len(prompts), "new_tokens": args.transfer_tokens,
                         "batch_size": batch_size, "rows": rows, "times": times}


# --- one matrix product, two kernels (why the packed weights are faster here) -------------------------------------

def bench_products(args, device, results: dict) -> None:
    """One ``nn.Linear`` of the ``--variant`` model per distinct shape, at a decode step's rows
    (``--transfer-batch``) and a prefill's (that many prompts x 60 tokens), multiplied by the default kernel
    (``F.linear``: MKL on x86) and by the layer itself inside ``lib.runtime.packed_linears`` (oneDNN on the weight
    packed once, as generation runs it), interleaved: GFLOP/s of each, their ratio and the largest difference of the
    products (they sum in different orders)."""
    from lib.models import load

    lm = load(args.family, args.variant, device=args.device, dtype=args.dtype)
    if not runtime.packed_linears_available(lm.model):
        log("products: the packed kernel does not apply here (needs a float32 model on the CPU)")
        return
    linears = {}
    for module in lm.model.modules():
        if type(module) is torch.nn.Linear:
            linears.setdefault(tuple(module.weight.shape), module)
    rows_per_step = args.transfer_batch or 32
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for (n_out, n_in), linear in sorted(linears.items()):
        with torch.inference_mode(), runtime.packed_linears(linear):  # linear(x) is the packed product in here
            for label, m in (("decode step", rows_per_step), ("prefill", rows_per_step * 60)):
                x = torch.randn(m, n_in, generator=generator)
                calls = min(200, max(3, int(2e9 / (2 * m * n_in * n_out))))  # ~2 GFLOP per timing, <= 200 calls

                def repeat(product):
                    def go():
                        for _ in range(calls):
                            out = product(x)
                        return out
                    return go

                methods = {"default": repeat(lambda x: torch.nn.functional.linear(x, linear.weight, linear.bias)),
                           "packed": repeat(linear)}
                times, outputs = common.interleaved(methods, args.repeats, methods, device)
                flop = 2 * m * n_in * n_out * calls
                rows.append({"product": f"{m} x {n_in} -> {n_out} ({label})",
                             "default GFLOP/s": flop / common.median(times["default"]) / 1e9,
                             "packed GFLOP/s": flop / common.median(times["packed"]) / 1e9,
                             "packed vs default": paired(times, "packed", "default"),
                             "max |diff|": float((outputs["packed"] - outputs["default"]).abs().max())})
    results["products"] = {"variant": args.variant, "threads": torch.get_num_threads(), "rows": rows}


# --- the generation-free forward passes on packed weights ----------------------------------------------------------

def bench_forward(args, device, results: dict) -> None:
    """lib's forward passes other than generation, as the chapters run them, with ``REFUSAL_BOOK_PACKED_LINEAR``
    ``all`` (oneDNN's products on weights packed once for every forward pass) and ``0`` (MKL everywhere),
    interleaved (the default, ``1``, packs the PGD attack and not the sweep or the capture): a layer sweep
    (``lib.layer_selection.layer_sweep``: 4 layers' random directions orthogonalised, refusal score of 16 harmful and
    KL of 16 harmless test prompts), residual capture (``lib.capture.collect``, 32 prompts, every layer) and the
    robustness check's PGD (2 steps of ``lib.adversary.pgd_attack`` on 32 harmful prompts with their refusals, at
    layer 4, under ``packed_products(..., gradients=True)`` as ``attacked_completions`` runs it). Each row: median
    seconds of both, their ratio, and the largest difference between the two results (the products sum in different
    orders)."""
    from lib import adversary, capture, data, layer_selection, organisms
    from lib.losses import response_loss
    from lib.models import load
    from lib.training_data import load_refusals, refusal_for

    target = (args.transfer_targets.split(",") if args.transfer_targets else default_targets(args.family))[0]
    lm = load(args.family, target, device=args.device, dtype=args.dtype)
    if not runtime.packed_linears_available(lm.model, gradients=True):
        log("forward: the packed kernel does not apply here (needs a float32 model on the CPU)")
        return
    pairs = data.split("test", 42)[:32]
    prompts = [p.harmful for p in pairs]  # what test_prompts(32) returns
    harmless = [p.harmless for p in pairs[:16]]
    refusals = load_refusals()
    batch, width = adversary._attack_batch(lm, [p.harmful for p in pairs],
                                           [refusal_for(p.id, refusals) for p in pairs])
    prompt_mask = batch["attention_mask"].clone()
    prompt_mask[:, width:] = 0
    layer = min(4, lm.info.n_layers - 1)
    epsilon = organisms.chosen_radius(args.family, layer) if args.family == "smollm2-135m" else 1.0
    candidates = random_directions(lm.info.n_layers, lm.info.d_model, args.seed + 2)
    sweep_layers = list(range(0, lm.info.n_layers, max(1, lm.info.n_layers // 4)))[:4]

    workloads = {
        "layer sweep (4 layers, 16 + 16 prompts)": lambda: torch.tensor(layer_selection.layer_sweep(
            lm, candidates, prompts[:16], harmless, sweep_layers)[["refusal score", "KL"]].to_numpy()),
        "capture (32 prompts, every layer)": lambda: capture.collect(lm, prompts)["resid_pre"],
        "PGD at layer 4 (2 steps, 32 prompts)": lambda: _packed_pgd(lm, batch, layer, epsilon, prompt_mask,
                                                                   response_loss),
    }
    rows = []
    for name, work in workloads.items():
        def setting(value):
            def go():
                with mock.patch.dict(os.environ, {runtime.PACKED_ENV: value}):
                    return work()
            return go

        log(f"forward: {name}")
        times, outputs = common.interleaved({"packed": setting("all"), "MKL": setting("0")}, args.repeats,
                                            {"packed": setting("all")}, device, log)
        rows.append({"workload": name, "packed median s": common.median(times["packed"]),
                     "MKL median s": common.median(times["MKL"]), "packed vs MKL": paired(times, "packed", "MKL"),
                     "max |diff|": float((outputs["packed"].double() - outputs["MKL"].double()).abs().max())})
    results["forward"] = {"target": target, "threads": torch.get_num_threads(), "rows": rows}


def _packed_pgd(lm, batch, layer, epsilon, prompt_mask, loss_fn) -> torch.Tensor:
    from lib.adversary import pgd_attack

    with runtime.packed_products(lm.model, "attack", gradients=True):
        return pgd_attack(lm, batch, layer, epsilon, 2, torch.Generator().manual_seed(0), prompt_mask, loss_fn)


# --- transfer-matrix workload ------------------------------------------------------------------------------------

def default_targets(family: str) -> list[str]:
    from lib.models import available_variants, variants

    names = variants(family)
    if all(t in names for t in PROFILE_TARGETS):
        return list(PROFILE_TARGETS)
    return [v for v in available_variants(family) if v != "base"] or ["base"]


def bench_transfer(args, device, results: dict) -> None:
    from lib.ablation import ablated, orthogonalized
    from lib.generation import generate
    from lib.judges import judge_all, rates
    from lib.models import available_variants, load

    targets = args.transfer_targets.split(",") if args.transfer_targets else default_targets(args.family)
    missing = [t for t in targets if t not in available_variants(args.family)]
    if missing:
        raise SystemExit(f"Variants {missing} of {args.family} are not available here; pass --transfer-targets.")
    n_conditions = args.transfer_conditions
    n_sources = math.ceil(n_conditions / len(targets))
    conditions = [(target, source) for target in targets for source in range(n_sources)][:n_conditions]
    prompts = test_prompts(args.transfer_prompts)
    log(f"transfer: {len(conditions)} conditions ({n_sources} sources x {len(targets)} targets), {len(prompts)} "
        f"prompts x {args.transfer_tokens} tokens, ablation by {args.transfer_ablation}, budget "
        f"{args.transfer_budget_s or 'none'} s")
    context = orthogonalized if args.transfer_ablation == "ortho" else ablated
    start = time.perf_counter()
    loads, runs = [], []
    directions = None
    stopped = False
    for target in dict.fromkeys(t for t, _ in conditions):
        if args.transfer_budget_s and runs and time.perf_counter() - start > args.transfer_budget_s:
            stopped = True
            break
        t0 = time.perf_counter()
        lm = load(args.family, target, device=args.device, dtype=args.dtype)
        loads.append(time.perf_counter() - t0)
        if directions is None:
            directions = random_directions(n_sources, lm.info.d_model, args.seed + 1)
        batch_size = args.transfer_batch or runtime.auto_batch_size(lm, 128, args.transfer_tokens, device)
        for _, source in [c for c in conditions if c[0] == target]:
            if args.transfer_budget_s and runs and time.perf_counter() - start > args.transfer_budget_s:
                stopped = True
                break
            t0 = time.perf_counter()
            with context(lm, directions[source]):
                completions, finished = generate(lm, prompts, args.transfer_tokens, batch_size, desc="transfer",
                                                 with_finished=True)
            labels = judge_all(completions)
            runs.append(time.perf_counter() - t0)
            log(f"  {target} <- source {source}: {runs[-1]:.1f} s, {sum(finished)}/{len(prompts)} ended early, "
                f"rates {rates(labels)}")
        del lm
        if stopped:
            break
    measured = time.perf_counter() - start
    remaining_runs = len(conditions) - len(runs)
    remaining_loads = len(dict.fromkeys(t for t, _ in conditions)) - len(loads)
    projected = measured + remaining_runs * common.median(runs) + remaining_loads * common.median(loads)
    results["transfer"] = {"conditions": len(conditions), "targets": targets, "sources": n_sources,
                           "prompts": len(prompts), "new_tokens": args.transfer_tokens, "batch_size": batch_size,
                           "ablation": args.transfer_ablation, "conditions_run": len(runs), "loads": loads,
                           "condition_seconds": runs, "measured_s": measured, "projected_total_s": projected,
                           "complete": remaining_runs == 0}


# --- report ------------------------------------------------------------------------------------------------------

TARGETS = [  # (what, numerator row, denominator row, section, target ratio)
    ("hooks vs plain generate", "lib hooks + KV cache", "plain generate, no ablation (the limit)", "generation", 0.85),
    ("orthogonalised vs plain generate", "lib orthogonalised weights + KV cache",
     "plain generate, no ablation (the limit)", "generation", 0.97),
    ("hooks vs the paper's recompute loop", "lib hooks + KV cache",
     "paper's loop: full prefix every token, no KV cache (lib hooks)", "generation", 10.0),
    ("hooks vs TransformerLens hooks", "lib hooks + KV cache", "TransformerLens hooks + KV cache", "generation", 1.5),
    ("capture vs bare forward", "lib.capture.collect", "bare forward pass (no capture)", "capture", 0.9),
    ("refusal score: shared prefix vs whole prompts", SCORE_LIB, SCORE_REFERENCE, "scoring", 1.5),
    ("refusal score: output layer as one product vs row by row (lib before 2026-12-02)", SCORE_LIB, SCORE_ROW_BY_ROW,
     "scoring", 1.0),
    ("greedy generation: lib vs lib before 2026-12-01 (issue 22)", GENERATE_LIB, GENERATE_KEEPING, "levers", 2.0),
    ("greedy generation: weights packed for oneDNN vs MKL products (lib of c1925c9)", GENERATE_LIB, GENERATE_MKL,
     "levers", 1.0),
    ("greedy generation: output layer as one product vs row by row (lib before 2026-12-02)", GENERATE_MKL,
     GENERATE_ROW_BY_ROW, "levers", 1.0),
    ("greedy generation in bfloat16 vs lib generate (changes the numbers)", GENERATE_BF16, GENERATE_LIB,
     "levers", 2.0),
]


def target_rows(results: dict) -> list[dict]:
    rows = []
    for what, top, bottom, section, goal in TARGETS:
        if section not in results:
            continue
        times = results[section]["times"]
        if bottom.startswith("paper's loop") and results[section].get("hooks_vs_loop"):
            ratio = results[section]["hooks_vs_loop"]  # measured in pairs of runs
        elif top in times and bottom in times and not bottom.startswith("paper's loop"):
            ratio = paired(times, top, bottom)  # both ran in every round
        else:
            continue
        rows.append({"target": what, "measured": f"{ratio:.2f}x", "goal": f">= {goal}x",
                     "met": "yes" if ratio >= goal else "NO"})
    return rows


def report(results: dict) -> str:
    m = results["machine"]
    lines = [f"# make bench: {results['family']}/{results['variant']} on {m['device']} ({m['cpu']}, {m['cores']} "
             f"cores, torch threads {m['torch_threads']}, load average {m['load_average_1m_at_start']} at start), "
             f"{m['date']}", ""]
    if "generation" in results:
        g = results["generation"]
        lines += [f"## Ablated greedy generation: {g['prompts']} prompts x {g['new_tokens']} new tokens, batch "
                  f"{g['batch_size']} (orthogonalisation itself: {g['orthogonalisation_setup_s']:.3f} s per "
                  "condition, not in its row)", "",
                  common.markdown_table(g["rows"], ["method", "runs", "median s", "new tokens/s", "vs plain",
                                                    "same tokens as lib hooks"]), ""]
    if "capture" in results:
        c = results["capture"]
        lines += [f"## Residual capture: {c['prompts']} prompts ({c['real_tokens']} tokens), {c['layers']} layers, "
                  f"resid_pre at the last token, batch {c['batch_size']}; kept: {common.fmt_bytes(c['kept_bytes'])} "
                  f"(all positions would be {common.fmt_bytes(c['all_positions_bytes'])})", "",
                  common.markdown_table(c["rows"], ["method", "runs", "median s", "tokens/s", "vs bare forward",
                                                    "peak memory", "kept", "max |diff| vs lib"]), ""]
    if "scoring" in results:
        c = results["scoring"]
        lines += [f"## Refusal-score forward passes: {c['prompts']} prompts, batch {c['batch_size']}, a shared prefix "
                  f"of {c['prefix_tokens']} tokens", "",
                  common.markdown_table(c["rows"], ["method", "runs", "median s", "prompts/s", "vs whole prompts",
                                                    "max |diff| of log-probs"]), ""]
    if "levers" in results:
        v = results["levers"]
        lines += [f"## Levers for lib's greedy generation: {v['target']}, a direction orthogonalised, {v['prompts']} "
                  f"prompts x {v['new_tokens']} tokens, batch {v['batch_size']}", "",
                  common.markdown_table(v["rows"], ["method", "runs", "median s", "vs lib generate",
                                                    "same completions", "same judge labels"]), ""]
    if "products" in results:
        p = results["products"]
        lines += [f"## One matrix product, two kernels: {p['variant']}'s linear layers, torch threads {p['threads']} "
                  "(default: MKL on x86; packed: oneDNN, the weight re-laid out once)", "",
                  common.markdown_table(p["rows"], ["product", "default GFLOP/s", "packed GFLOP/s",
                                                    "packed vs default", "max |diff|"]), ""]
    if "forward" in results:
        f = results["forward"]
        lines += [f"## lib's forward passes besides generation, on {f['target']}, torch threads {f['threads']}: "
                  "weights packed for oneDNN (REFUSAL_BOOK_PACKED_LINEAR=all) vs MKL's products (=0)", "",
                  common.markdown_table(f["rows"], ["workload", "packed median s", "MKL median s", "packed vs MKL",
                                                    "max |diff|"]), ""]
    if "transfer" in results:
        t = results["transfer"]
        status = ("complete" if t["complete"]
                  else f"{t['conditions_run']} of {t['conditions']} conditions run, rest projected")
        lines += [f"## Transfer-matrix workload: {t['conditions']} conditions ({t['sources']} sources x "
                  f"{len(t['targets'])} targets) x {t['prompts']} prompts x {t['new_tokens']} tokens, batch "
                  f"{t['batch_size']}, ablation by {t['ablation']}", "",
                  f"- measured: {t['measured_s']:.0f} s ({status}); per condition median "
                  f"{common.median(t['condition_seconds']):.1f} s; model load median {common.median(t['loads']):.1f} s",
                  f"- end to end: {t['projected_total_s']:.0f} s ({t['projected_total_s'] / 60:.1f} min)", ""]
    rows = target_rows(results)
    if rows:
        lines += ["## Targets (ratios of throughputs measured in this run)", "",
                  common.markdown_table(rows, ["target", "measured", "goal", "met"]), ""]
    if results.get("peer_error"):
        lines += [f"Peer unavailable: {results['peer_error']}", ""]
    lines.append(f"Command: {results['command']}  (wall time {results['wall_s']:.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--family", default="smollm2-135m")
    parser.add_argument("--variant", default="base")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads; 0: the cores that the 1-minute load average leaves idle (at least 1, at "
                             "most torch's default). On a shared machine, more threads than idle cores make torch's "
                             "OpenMP threads wait on each other: 2-7x slower and very noisy timings here")
    parser.add_argument("--sections", default="generation,capture,scoring,products,levers,forward,transfer")
    parser.add_argument("--peer", choices=("transformer_lens", "none"), default="transformer_lens")
    parser.add_argument("--prompts", type=int, default=8,
                        help="generation: prompts (the paper's batch is 16; 8 keeps the recompute loop short)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="generation/capture batch (default: auto)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recompute-repeats", type=int, default=1, help="the paper's loop is slow; 0 skips it")
    parser.add_argument("--capture-prompts", type=int, default=32)
    parser.add_argument("--capture-repeats", type=int, default=3)
    parser.add_argument("--score-prompts", type=int, default=64)
    parser.add_argument("--score-batch", type=int, default=16)
    parser.add_argument("--transfer-conditions", type=int, default=16)
    parser.add_argument("--transfer-prompts", type=int, default=64)
    parser.add_argument("--transfer-tokens", type=int, default=64)
    parser.add_argument("--transfer-batch", type=int, default=32, help="0: auto")
    parser.add_argument("--transfer-targets", default=None, help="comma-separated variants (default: the profile's)")
    parser.add_argument("--transfer-ablation", choices=("ortho", "hooks"), default="ortho",
                        help="ortho is what lib.ablation.Intervention uses when the weights allow it")
    parser.add_argument("--transfer-budget-s", type=float, default=120.0,
                        help="stop starting new conditions after this many seconds and project the rest; 0: run all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the JSON and markdown results "
                                                    "(default: artifacts/benchmarks)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or idle_threads())
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args, argv) -> dict:
    wall = time.perf_counter()
    os.environ.setdefault("REFUSAL_BOOK_PROGRESS", "0")
    from lib.models import load
    from lib.runtime import resolve_device

    device = resolve_device(args.device)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    results = {"family": args.family, "variant": args.variant, "machine": common.machine(device),
               "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
               "args": vars(args)}
    lm = peer = None
    if {"generation", "capture", "scoring"} & set(sections):
        log(f"loading {args.family}/{args.variant} on {device}")
        lm = load(args.family, args.variant, device=args.device, dtype=args.dtype)
        if args.peer != "none":
            from benchmarks.peers import PeerUnavailable, TransformerLensPeer

            try:
                peer = TransformerLensPeer(lm)
                results["peer"] = {"name": peer.name, "version": peer.version, "kv_cache_patch": peer.patched}
            except PeerUnavailable as error:
                results["peer_error"] = str(error)
                log(f"peer unavailable: {error}")
    if "generation" in sections:
        bench_generation(lm, args, peer, device, results)
    if "capture" in sections:
        bench_capture(lm, args, peer, device, results)
    if "scoring" in sections:
        bench_scoring(lm, args, device, results)
    del lm, peer
    if "products" in sections:
        bench_products(args, device, results)
    if "levers" in sections:
        bench_levers(args, device, results)
    if "forward" in sections:
        bench_forward(args, device, results)
    if "transfer" in sections:
        bench_transfer(args, device, results)
    results["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    results["wall_s"] = time.perf_counter() - wall
    text = report(results)
    print(text)
    common.write_results(results, text, f"bench-{results['machine']['date']}-{args.family}-{device.type}", args.out)
    return results


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
