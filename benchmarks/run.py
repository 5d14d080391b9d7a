"""`make bench`: lib's ablation, capture, scoring and generation against their limits and peers, on one model.

Sections (``--sections``), each with the same prompts for every method it compares: ``generation`` (greedy, exactly
``--new-tokens`` tokens, a random direction ablated everywhere: plain ``generate`` | lib hooks | lib orthogonalised
weights | the paper's loop without KV cache | TransformerLens hooks); ``capture`` (resid_pre of every layer at the
last token: a bare forward pass | ``lib.capture.collect`` | ``output_hidden_states``; time and peak memory);
``scoring`` (the refusal score with the prompts' shared prefix run once, against whole prompts); ``packed`` (the
optional CPU speed-up ``lib.packed`` against MKL on what it packs: a transfer condition generated and the PGD attack
by default, a layer sweep and capture with ``all``); ``training`` (one optimiser step of the control, AT and LAT
from SSFT, packed and MKL, and AT's and LAT's step against the plain PEFT step). Medians of ``--repeats`` interleaved rounds after a warm-up;
ratios are medians of within-round ratios. Tables go to stdout and ``artifacts/benchmarks/bench-*.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from unittest import mock

import torch

from benchmarks import common
from benchmarks.common import agreement, hf_greedy, log, paired, random_directions, recompute_greedy
from benchmarks.peers import PeerUnavailable, TransformerLensPeer
from lib import batching, layer_selection, training
from lib.ablation import ablated, check_directions, orthogonalized
from lib.adversary import Attack, attacked_completions
from lib.capture import collect, order_by_length
from lib.data import split
from lib.generation import generate
from lib.hooks import check_layers
from lib.inputs import LAST_POSITION, encode, forward, split_common_prefix
from lib.models import available_variants, load
from lib.organisms import chosen_radius
from lib.packed import PACKED_ENV, packed_linears_available, packed_products
from lib.runtime import resolve_device
from lib.scores import next_token_log_probs
from lib.training_data import load_refusals, refusal_for

PLAIN, HOOKS, ORTHO = ("plain generate, no ablation (the limit)", "lib hooks + KV cache",
                       "lib orthogonalised weights + KV cache")
LOOP, PAIRED = "paper's loop: full prefix every token, no KV cache (lib hooks)", "lib hooks (paired with the loop)"
PEER_GENERATE = "TransformerLens hooks + KV cache"
BARE, COLLECT, HIDDEN = "bare forward pass (no capture)", "lib.capture.collect", "HF output_hidden_states=True"
SCORE_WHOLE, SCORE_LIB = "whole prompts, left-padded", "lib.scores.next_token_log_probs (shared prefix)"
GENERATION = "greedy generation (one transfer condition, a direction orthogonalised)"


def test_prompts(n: int) -> list[str]:
    pool = [pair.harmful for pair in split("test", 42)]
    return [pool[i % len(pool)] for i in range(n)]


def encode_batches(lm, prompts, batch_size):
    order = order_by_length(lm, prompts)
    return [encode(lm, [prompts[i] for i in order[i:i + batch_size]]) for i in range(0, len(order), batch_size)]


def bench_generation(lm, args, peer, device, results: dict) -> None:
    prompts, n_new = test_prompts(args.prompts), args.new_tokens
    longest = max(b["input_ids"].shape[1] for b in encode_batches(lm, prompts, len(prompts)))
    size = args.batch_size or min(len(prompts), batching.auto_batch_size(lm, longest, n_new, device, kv_cache=False))
    batches = encode_batches(lm, prompts, batching.balanced(len(prompts), size))
    direction = random_directions(1, lm.info.d_model, args.seed)[0]
    basis = check_directions(direction, lm.info.d_model)
    log(f"generation: {len(prompts)} prompts in {len(batches)} batches, {n_new} new tokens")
    edits: list[float] = []

    def under(context, n, loop=hf_greedy):
        def run():
            t0 = time.perf_counter()
            with context(lm, direction):
                t1 = time.perf_counter()
                out = torch.cat([loop(lm, b, n).cpu() for b in batches])
                t2 = time.perf_counter()
            if context is orthogonalized:
                edits.append(t1 - t0 + time.perf_counter() - t2)  # editing and restoring the weights
            return out
        return run

    def plain(n):
        return lambda: torch.cat([hf_greedy(lm, b, n).cpu() for b in batches])

    methods = {PLAIN: plain(n_new), HOOKS: under(ablated, n_new), ORTHO: under(orthogonalized, n_new)}
    warm = min(n_new, 8)
    warmups = {"plain": plain(warm), "hooks": under(ablated, warm), "ortho": under(orthogonalized, warm)}
    if peer is not None:
        methods[PEER_GENERATE] = lambda: torch.cat([peer.generate(b, n_new, basis) for b in batches])
        warmups["peer"] = lambda: peer.generate(batches[0], warm, basis)
    times, outputs = common.interleaved(methods, args.repeats, warmups, device)
    times[ORTHO] = [t - s for t, s in zip(times[ORTHO], edits[-args.repeats:])]  # the edit is reported apart
    ratios = {name: paired(times, name, PLAIN) for name in times}
    if args.recompute_repeats > 0:  # each run of the slow loop paired with a run of lib hooks just before it
        loop = {PAIRED: methods[HOOKS], LOOP: under(ablated, n_new, recompute_greedy)}
        loop_times, loop_out = common.interleaved(loop, args.recompute_repeats, None, device)
        times[LOOP], outputs[LOOP] = loop_times[LOOP], loop_out[LOOP]
        ratios[LOOP] = ratios[HOOKS] / paired(loop_times, PAIRED, LOOP)
    rows = [{"method": name, "runs": len(s), "median s": common.median(s),
             "new tokens/s": len(prompts) * n_new / common.median(s), "vs plain": ratios[name],
             "same tokens as lib hooks": None if name == PLAIN else agreement(outputs[name], outputs[HOOKS])}
            for name, s in times.items()]
    results["generation"] = {"prompts": len(prompts), "batch_size": batches[0]["input_ids"].shape[0],
                             "new_tokens": n_new, "orthogonalisation_setup_s": common.median(edits),
                             "ablation_changes_tokens": agreement(outputs[PLAIN], outputs[HOOKS]) < 1.0,
                             "rows": rows, "times": {**times, **(loop_times if args.recompute_repeats > 0 else {})}}


def bench_capture(lm, args, device, results: dict) -> None:
    prompts, layers = test_prompts(args.capture_prompts), check_layers(lm.info, None)
    longest = max(b["input_ids"].shape[1] for b in encode_batches(lm, prompts, len(prompts)))
    size = args.batch_size or min(len(prompts), batching.auto_batch_size(lm, longest, 0, device))
    size = batching.balanced(len(prompts), size)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in encode_batches(lm, prompts, size))
    n, d = len(prompts), lm.info.d_model
    log(f"capture: {n} prompts ({real_tokens} tokens), batch {size}, {len(layers)} layers")

    def per_batch(fn, texts):
        def run():
            order, out = order_by_length(lm, texts), torch.zeros(len(texts), len(layers), d)
            with torch.inference_mode():
                for i in range(0, len(texts), size):
                    rows = order[i:i + size]
                    value = fn(encode(lm, [texts[r] for r in rows]))
                    if value is not None:
                        out[rows] = value
            return out
        return run

    def hidden_states(batch):
        states = forward(lm, batch, output_hidden_states=True).hidden_states
        return torch.stack([states[layer][:, -1] for layer in layers], 1).float().cpu()

    def methods(texts):
        return {BARE: per_batch(lambda b: (forward(lm, b), None)[1], texts),
                COLLECT: lambda: collect(lm, texts, layers=layers, batch_size=size)["resid_pre"],
                HIDDEN: per_batch(hidden_states, texts)}

    timed, warm = methods(prompts), methods(prompts[:2])
    peaks, outputs = {}, {}
    for name, fn in timed.items():  # a short warm-up, then each method's peak memory on its own
        warm[name]()
        with common.PeakMemory(device) as peak:
            outputs[name] = fn()
        peaks[name] = peak.bytes
    times, _ = common.interleaved(timed, args.repeats, None, device)
    kept = n * len(layers) * d * 4
    rows = [{"method": name, "runs": len(s), "median s": common.median(s), "tokens/s": real_tokens / common.median(s),
             "vs bare forward": paired(times, name, BARE), "peak memory": common.fmt_bytes(peaks[name]),
             "kept": "-" if name == BARE else common.fmt_bytes(kept),
             "max |diff| vs lib": None if name == BARE else float((outputs[name] - outputs[COLLECT]).abs().max())}
            for name, s in times.items()]
    results["capture"] = {"prompts": n, "layers": len(layers), "batch_size": size, "real_tokens": real_tokens,
                          "kept_bytes": kept, "all_positions_bytes": real_tokens * len(layers) * d * 4,
                          "rows": rows, "times": times}


def bench_scoring(lm, args, device, results: dict) -> None:
    prompts, size = test_prompts(args.score_prompts), args.score_batch
    prefix, _ = split_common_prefix(lm, prompts)
    log(f"scoring: {len(prompts)} prompts, batch {size}, shared prefix {len(prefix)} tokens")

    def last_log_probs(texts):
        logits = forward(lm, encode(lm, texts), logits_to_keep=LAST_POSITION).logits[:, -1]
        return torch.log_softmax(logits.double(), dim=-1).cpu()

    def methods(texts):
        def whole():
            with torch.inference_mode():
                return torch.cat([last_log_probs(texts[i:i + size]) for i in range(0, len(texts), size)])
        return {SCORE_WHOLE: whole, SCORE_LIB: lambda: next_token_log_probs(lm, texts, size)}

    times, outputs = common.interleaved(methods(prompts), args.repeats, methods(prompts[:2]), device)
    rows = [{"method": name, "runs": len(s), "median s": common.median(s), "vs whole prompts":
             paired(times, name, SCORE_WHOLE), "max |diff| of log-probs":
             float((outputs[name] - outputs[SCORE_WHOLE]).abs().max())} for name, s in times.items()]
    results["scoring"] = {"prompts": len(prompts), "batch_size": size, "prefix_tokens": len(prefix), "rows": rows,
                          "times": times}


def with_setting(value: str, work):
    """``work`` as a callable that runs with ``REFUSAL_BOOK_PACKED_LINEAR=value``."""
    def run():
        with mock.patch.dict(os.environ, {PACKED_ENV: value}):
            return work()
    return run


def bench_packed(args, device, results: dict) -> None:
    """Each workload with ``REFUSAL_BOOK_PACKED_LINEAR`` as lib packs it (``1``: generation and the attack; ``all``:
    also scores and capture) against ``0`` (MKL's products everywhere), interleaved, and how far the results agree."""
    trained = [v for v in available_variants(args.family) if v != "base"]
    target = args.packed_variant or ("ssft" if "ssft" in trained else (trained or ["base"])[0])
    lm = load(args.family, target, device=args.device, dtype=args.dtype)
    if not packed_linears_available(lm.model, gradients=True):
        log("packed: the packed kernel does not apply here (needs a float32 model on the CPU)")
        return
    pairs = split("test", 42)[:32]
    prompts, harmless = test_prompts(args.packed_prompts), [p.harmless for p in pairs[:16]]
    attacked, refusals = [p.harmful for p in pairs], load_refusals()
    layer = min(4, lm.info.n_layers - 1)
    epsilon = chosen_radius(args.family, layer) if args.family == "smollm2-135m" else 1.0
    direction = random_directions(1, lm.info.d_model, args.seed + 1)[0]
    candidates = random_directions(lm.info.n_layers, lm.info.d_model, args.seed + 2)
    sweep_layers = list(range(0, lm.info.n_layers, max(1, lm.info.n_layers // 4)))[:4]

    def transfer_condition():
        with orthogonalized(lm, direction):
            return generate(lm, prompts, args.new_tokens, args.packed_batch)

    workloads = {  # name: (the setting that packs it, the work)
        GENERATION: ("1", transfer_condition),
        "layer sweep (4 layers, 16 + 16 prompts)": ("all", lambda: torch.tensor(layer_selection.layer_sweep(
            lm, candidates, {"harmful": attacked[:16], "harmless": harmless}, sweep_layers)[["refusal score", "KL"]]
            .to_numpy())),
        "capture (32 prompts, every layer)": ("all", lambda: collect(lm, attacked)["resid_pre"]),
        "PGD at layer 4 (2 steps, 32 prompts with their refusals)": ("1", lambda: attacked_completions(
            lm, attacked, [refusal_for(p.id, refusals) for p in pairs], Attack(layer, epsilon, 2, 1), batch_size=32))}
    rows, all_times = [], {}
    for name, (value, work) in workloads.items():
        log(f"packed: {name}")
        methods = {"packed": with_setting(value, work), "MKL": with_setting("0", work)}
        times, out = common.interleaved(methods, args.repeats, {"packed": methods["packed"]}, device)
        all_times.update({f"packed: {name}": times["packed"], f"MKL: {name}": times["MKL"]})
        if isinstance(out["MKL"], list):
            agree = f"{sum(a == b for a, b in zip(out['packed'], out['MKL']))}/{len(out['MKL'])} completions identical"
        else:
            agree = f"max |diff| {(out['packed'].double() - out['MKL'].double()).abs().max():.2g}"
        rows.append({"workload": name, "setting": value, "packed median s": common.median(times["packed"]),
                     "MKL median s": common.median(times["MKL"]), "packed vs MKL": paired(times, "packed", "MKL"),
                     "agreement": agree})
    results["packed"] = {"target": target, "threads": torch.get_num_threads(), "rows": rows, "times": all_times}


TRAINING_KINDS = {"control": "plain PEFT step (the control: one forward and backward)",
                  "at": "AT step (PGD at the embeddings, then the step)",
                  "lat": "LAT step (PGD at the LAT layer, then the step)"}


def bench_training(args, device, results: dict) -> None:
    """One optimiser step of each organism kind (``lib.training.training_step``) on the same batch of the recipe's
    size, from the SSFT model: the control's plain PEFT step against AT's and LAT's (``pgd_steps`` PGD steps, each a
    forward and a backward pass, then the step: about 7 passes), each with the frozen weights packed for oneDNN
    (``REFUSAL_BOOK_PACKED_LINEAR=1``, the default) and with MKL (``0``). Each round times ``--train-steps`` steps in
    one packing, as a training run packs once."""
    if args.family not in training.recipes():
        log(f"training: skipped, {args.family} has no training recipe in lib/recipes.yaml")
        return
    stages = training.recipe(args.family)
    examples = training.recipe_examples(args.family)
    start = "ssft" if "ssft" in available_variants(args.family) else "base"  # what AT and LAT train from
    rows, all_times = [], {}
    for kind, name in TRAINING_KINDS.items():
        lm = load(args.family, start, device=args.device, dtype=args.dtype)
        layer = {"at": 0, "lat": lm.info.adversary_layer}.get(kind)
        extra = {} if layer is None else {"epsilon": chosen_radius(args.family, layer), "adversary_layer": layer}
        config = training.TrainConfig(kind=kind, seed=args.seed, **{k: v for k, v in stages["adversarial"].items()
                                                                     if k not in ("why", "kind")}, **extra)
        run = training.prepare_run(lm, config)
        chosen = examples[:config.batch_size]
        generator = torch.Generator().manual_seed(args.seed)

        def steps():
            with packed_products(lm.model, "training", gradients=True):
                return [training.training_step(lm, run, chosen, config, generator, step)["loss"]
                        for step in range(args.train_steps)]

        log(f"training: {name}")
        methods = {"packed": with_setting("1", steps), "MKL": with_setting("0", steps)}
        times, _ = common.interleaved(methods, args.repeats, methods, device)  # both warmed up: no cold first round
        all_times.update({f"packed: {name}": times["packed"], f"MKL: {name}": times["MKL"]})
        rows.append({"step": name, "packed s/step": common.median(times["packed"]) / args.train_steps,
                     "MKL s/step": common.median(times["MKL"]) / args.train_steps,
                     "packed vs MKL": paired(times, "packed", "MKL")})
    plain = {setting: all_times[f"{setting}: {TRAINING_KINDS['control']}"] for setting in ("packed", "MKL")}
    for row, kind in zip(rows, TRAINING_KINDS):
        for setting in ("packed", "MKL"):
            row[f"vs plain step ({setting})"] = common.median(
                [t / p for t, p in zip(all_times[f"{setting}: {TRAINING_KINDS[kind]}"], plain[setting])])
    results["training"] = {"start": start, "batch_size": stages["adversarial"]["batch_size"], "steps_per_round": args.train_steps,
                           "threads": torch.get_num_threads(), "rows": rows, "times": all_times}


# (what, numerator, denominator, section, goal): ratios of throughputs measured side by side in this run
TARGETS = [("hooks vs plain generate", HOOKS, PLAIN, "generation", 0.85),
           ("orthogonalised vs plain generate", ORTHO, PLAIN, "generation", 0.97),
           ("hooks vs the paper's recompute loop", PAIRED, LOOP, "generation", 10.0),
           ("hooks vs TransformerLens hooks", HOOKS, PEER_GENERATE, "generation", 1.5),
           ("capture vs bare forward", COLLECT, BARE, "capture", 0.9),
           ("refusal score: shared prefix vs whole prompts", SCORE_LIB, SCORE_WHOLE, "scoring", 1.5),
           ("greedy generation: packed weights vs MKL", f"packed: {GENERATION}", f"MKL: {GENERATION}", "packed", 1.0),
           ("LAT training step: packed weights vs MKL", f"packed: {TRAINING_KINDS['lat']}",
            f"MKL: {TRAINING_KINDS['lat']}", "training", 1.0)]
SECTIONS = {  # section: (title from its results, columns)
    "generation": (lambda g: f"Ablated greedy generation: {g['prompts']} prompts x {g['new_tokens']} new tokens, "
                   f"batch {g['batch_size']} (orthogonalisation {g['orthogonalisation_setup_s']:.3f} s a condition, "
                   "not in its row)", ["method", "runs", "median s", "new tokens/s", "vs plain",
                                       "same tokens as lib hooks"]),
    "capture": (lambda c: f"Residual capture: {c['prompts']} prompts ({c['real_tokens']} tokens), {c['layers']} "
                f"layers, batch {c['batch_size']}; kept {common.fmt_bytes(c['kept_bytes'])}",
                ["method", "runs", "median s", "tokens/s", "vs bare forward", "peak memory", "max |diff| vs lib"]),
    "scoring": (lambda s: f"Refusal score: {s['prompts']} prompts, batch {s['batch_size']}, shared prefix "
                f"{s['prefix_tokens']} tokens", ["method", "runs", "median s", "vs whole prompts",
                                                 "max |diff| of log-probs"]),
    "training": (lambda t: f"One training step from {t['start']}, batch {t['batch_size']} ({t['steps_per_round']} steps a round, "
                 f"torch threads {t['threads']}); 'vs plain step': a step's time over the plain PEFT step's, in the "
                 "same setting (7 passes is the naive cost of 6 PGD steps)",
                 ["step", "packed s/step", "MKL s/step", "packed vs MKL", "vs plain step (packed)",
                  "vs plain step (MKL)"]),
    "packed": (lambda p: f"oneDNN's packed weights (lib.packed) vs MKL, {p['target']}, torch threads {p['threads']}",
               ["workload", "setting", "packed median s", "MKL median s", "packed vs MKL", "agreement"]),
}


def target_rows(results: dict) -> list[dict]:
    rows = []
    for what, top, bottom, section, goal in TARGETS:
        times = results.get(section, {}).get("times", {})
        if top not in times or bottom not in times:
            continue
        ratio = paired(times, top, bottom)
        rows.append({"target": what, "measured": f"{ratio:.2f}x", "goal": f">= {goal}x",
                     "met": "yes" if ratio >= goal else "NO"})
    return rows


def report(results: dict) -> str:
    m = results["machine"]
    lines = [f"# make bench: {results['family']}/{results['variant']} on {m['device']} ({m['cpu']}, {m['cores']} "
             f"cores, torch threads {m['torch_threads']}, load average {m['load_average_1m_at_start']}), {m['date']}",
             ""]
    for section, (title, columns) in SECTIONS.items():
        if section in results:
            lines += [f"## {title(results[section])}", "", common.markdown_table(results[section]["rows"], columns), ""]
    if rows := target_rows(results):
        lines += ["## Targets", "", common.markdown_table(rows, ["target", "measured", "goal", "met"]), ""]
    if results.get("peer_error"):
        lines += [f"Peer unavailable: {results['peer_error']}", ""]
    return "\n".join(lines + [f"Command: {results['command']}  (wall time {results['wall_s']:.0f} s)"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--family", default="smollm2-135m")
    parser.add_argument("--variant", default="base", help="the model of generation, capture and scoring")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: the cores left idle")
    parser.add_argument("--sections", default="generation,capture,scoring,packed,training")
    parser.add_argument("--peer", choices=("transformer_lens", "none"), default="transformer_lens")
    parser.add_argument("--batch-size", type=int, default=None, help="generation/capture batch (default: auto)")
    parser.add_argument("--packed-variant", default=None, help="default: ssft, else the first trained variant")
    # --prompts: generation's (8 keeps the paper's loop short); --recompute-repeats 0 skips the paper's loop
    for flag, default in (("--prompts", 8), ("--new-tokens", 64), ("--repeats", 3), ("--recompute-repeats", 1),
                          ("--capture-prompts", 32), ("--score-prompts", 64), ("--score-batch", 16),
                          ("--packed-prompts", 64), ("--packed-batch", 32), ("--train-steps", 2), ("--seed", 0)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--out", default=None, help="results folder (default: artifacts/benchmarks)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or common.idle_threads())
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args, argv) -> dict:
    wall = time.perf_counter()
    device = resolve_device(args.device)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    results = {"family": args.family, "variant": args.variant, "machine": common.machine(device), "args": vars(args),
               "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])}
    lm = peer = None
    if {"generation", "capture", "scoring"} & set(sections):
        lm = load(args.family, args.variant, device=args.device, dtype=args.dtype)
        if args.peer != "none" and "generation" in sections:
            try:
                peer = TransformerLensPeer(lm)
                results["peer"] = {"name": peer.name, "version": peer.version, "kv_cache_patch": peer.patched}
            except PeerUnavailable as error:
                results["peer_error"] = str(error)
                log(f"peer unavailable: {error}")
    if "generation" in sections:
        bench_generation(lm, args, peer, device, results)
    for section, bench in (("capture", bench_capture), ("scoring", bench_scoring)):
        if section in sections:
            bench(lm, args, device, results)
    del lm, peer
    if "packed" in sections:
        bench_packed(args, device, results)
    if "training" in sections:
        bench_training(args, device, results)
    results["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    results["wall_s"] = time.perf_counter() - wall
    text = report(results)
    print(text)
    common.write_results(results, text, f"bench-{results['machine']['date']}-{args.family}-{device.type}", args.out)
    return results


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
