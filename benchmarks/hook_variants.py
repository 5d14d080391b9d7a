"""Which formulation of the ablation hook costs the least host time on a GPU (an exploration for issue 6; see
BENCHMARKS.md): generation of the paper's batch (16 prompts x 64 new tokens) on the random Llama-2-7B-shaped model
under 65 hooks (lib's layout) that each compute ``x - (x B^T) B`` a different way, against plain ``generate`` and
against hooks that compute nothing (the dispatch floor). ``--smoke``: tiny shapes, CPU allowed."""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import common
from benchmarks.gpu_bench import LLAMA2_7B, SMOKE, random_model, random_prompts
from benchmarks.run import hf_greedy, paired, random_directions
from lib.ablation import ablated
from lib.hooks import attached, input_hook, output_hook


def layout(lm, fn):
    """lib's layout: layer 0's input, then every attention and MLP output."""
    hooks = [(lm.info.layers[0], "pre", input_hook(fn))]
    for layer in range(lm.info.n_layers):
        hooks += [(lm.info.submodule(layer, "attn"), "post", output_hook(fn)),
                  (lm.info.submodule(layer, "mlp"), "post", output_hook(fn))]
    return hooks


def variants(basis: torch.Tensor, compile_ok: bool) -> dict:
    b = basis
    b_t = basis.T.contiguous()
    b0 = basis[0].contiguous()

    def mm_addmm(h):
        flat = h.reshape(-1, h.shape[-1])
        return torch.addmm(flat, torch.mm(flat, b_t), b, alpha=-1).view(h.shape)

    def mv_addr(h):
        flat = h.reshape(-1, h.shape[-1])
        return torch.addr(flat, torch.mv(flat, b0), b0, alpha=-1).view(h.shape)

    def mul_sum_addcmul(h):
        return torch.addcmul(h, (h * b0).sum(-1, keepdim=True), b0, value=-1)

    def three_kernels(h):
        return h - (h @ b_t) @ b

    out = {"noop hooks (dispatch only)": lambda h: None, "mm + sub (before)": three_kernels,
           "mm + addmm (lib, k > 1)": mm_addmm, "mv + addr (k=1)": mv_addr, "mul, sum, addcmul (lib, k = 1)": mul_sum_addcmul}
    if compile_ok:
        compiled = torch.compile(lambda h: h - (h @ b_t) @ b, dynamic=True, fullgraph=True)
        out["torch.compile (one fused kernel)"] = compiled
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = random_model(SMOKE if args.smoke else LLAMA2_7B, device, dtype)
    batch = __import__("lib.inputs", fromlist=["encode"]).encode(lm, random_prompts(16, lm.model.config.vocab_size, 1))
    basis = random_directions(1, lm.info.d_model, 0)[0]
    basis = (basis / basis.norm()).unsqueeze(0).to(device, dtype)
    n = args.new_tokens
    methods = {"plain generate": lambda: hf_greedy(lm, batch, n)}
    compile_ok = not args.no_compile and device.type == "cuda"
    for name, fn in variants(basis, compile_ok).items():
        hooks = layout(lm, fn)

        def run(hooks=hooks):
            with attached(hooks):
                return hf_greedy(lm, batch, n)
        t0 = time.perf_counter()
        try:
            run()  # warm-up (and compilation)
        except Exception as error:  # noqa: BLE001 - an exploration: report and go on
            print(f"{name}: failed: {type(error).__name__}: {error}"[:300])
            continue
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        methods[name] = run

    def shipped():
        with ablated(lm, basis):  # the whole of lib's path, to compare with its body above in the same process
            return hf_greedy(lm, batch, n)
    shipped()
    methods["lib.ablation.ablated (as shipped)"] = shipped
    times, outputs = common.interleaved(methods, args.repeats, {"plain": methods["plain generate"]}, device)
    reference = outputs["mul, sum, addcmul (lib, k = 1)"]
    rows = {name: {"median s": common.median(seconds), "vs plain": paired(times, name, "plain generate"),
                   "same tokens as lib": (outputs[name] == reference).all(1).float().mean().item()}
            for name, seconds in times.items()}
    print(f"| hook body ({len(layout(lm, None))} hooks) | median s | vs plain | same tokens as lib |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['median s']:.3f} | {row['vs plain']:.3f} | {row['same tokens as lib']:.2f} |")
    return rows

if __name__ == "__main__":
    main()
