"""An optional CPU speed-up: float32 products on weights packed once for oneDNN.

On a CPU, torch's default float32 product (MKL) re-packs the weight on every call; oneDNN can multiply by a weight
re-laid out once. The products are not bit-identical to MKL's, so lib uses them where ``packed_setting`` says (one
switch, ``REFUSAL_BOOK_PACKED_LINEAR``), and the science modules call one function, ``packed_products``. A no-op on
CUDA, in bfloat16, and where the packed copies would not fit in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from lib.batching import available_memory


PACKED_ENV = "REFUSAL_BOOK_PACKED_LINEAR"  # where lib multiplies by packed weights: see packed_setting
# which of lib's forward passes each setting packs (generation; the robustness check's PGD; the frozen weights in
# training; scores and capture)
PACKED_USES = {"0": (), "1": ("generation", "attack", "training"),
               "all": ("generation", "attack", "training", "measurement")}


def packed_linears_available(model: torch.nn.Module, gradients: bool = False) -> bool:
    """Whether ``packed_linears`` applies: a float32 model on the CPU with oneDNN present, whose packed copies fit in
    half the free memory."""
    return _packing_fits(model, _packable(model, gradients), gradients)


def _packing_fits(model: torch.nn.Module, linears: list[torch.nn.Linear], gradients: bool) -> bool:
    weight = next(model.parameters())
    if not (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    copies = 2 if gradients else 1
    packed_bytes = copies * sum(m.weight.numel() * m.weight.element_size() for m in linears)
    return packed_bytes <= available_memory("cpu") // 2


def _packable(model: torch.nn.Module, gradients: bool) -> list[torch.nn.Linear]:
    return [module for module in model.modules() if type(module) is torch.nn.Linear
            and not (gradients and any(p.requires_grad for p in module.parameters()))]


def packed_setting() -> str:
    """``REFUSAL_BOOK_PACKED_LINEAR``: where lib multiplies by weights packed for oneDNN (``packed_products``).
    ``1`` (or unset, the default): generation and the robustness check's PGD attacks, whose outputs (greedy
    completions, judged rates) are the same as with MKL in every chapter and on both kernels (AVX-512, AVX2), and the
    frozen weights of a training run (``lib.training``): a trained adapter's last bits depend on the setting, as they
    do on the CPU, so every training log records it.
    ``all``: also the generation-free scores and activation capture, faster again, but the numbers the chapters
    print from them move in the last bits, and a few that sit on a rounding boundary print differently on oneDNN's
    AVX-512 and AVX2 kernels (``BENCHMARKS.md``, "Levers in the code today"), so the committed chapters use 1.
    ``0``: MKL everywhere."""
    value = os.environ.get(PACKED_ENV, "1")
    if value not in PACKED_USES:
        raise ValueError(f"{PACKED_ENV}={value!r}: use 1 (the default: generation, the PGD attacks and training "
                         "multiply by weights packed for oneDNN), all (scores and capture too; their printed digits move) or 0 "
                         "(the default kernel everywhere, MKL on x86).")
    return value


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, gradients: bool = False) -> Iterator[int]:
    """Computation in which every ``nn.Linear`` of a float32 CPU model multiplies by a weight that oneDNN has
    re-laid out once for its kernels (``torch.ops.mkldnn``), instead of the default kernel (MKL) re-packing the
    weight on every call. That saves most on the few rows of a decode step, where re-packing is a large share of
    each product, and on CPUs with AVX-512, where oneDNN's kernel is also the faster one; on AVX2-only CPUs the gain
    is small (see ``BENCHMARKS.md``, ``make bench --sections packed``). The products are not bit-identical
    to MKL's (logits move by ~1e-4); lib computes with them where ``packed_setting`` says. A no-op elsewhere (CUDA,
    bfloat16), and when the packed copies would take more than half the free memory (a large float32 model on a
    CPU). Yields the number of layers it packed.

    ``gradients=True`` also packs each weight's transpose, so that autograd can carry a gradient back through the
    layer to its input with oneDNN too (a PGD attack on the activations); the weights themselves get none, so a layer
    whose weight or bias requires a gradient (training) keeps its own forward. Wherever autograd needs more than a
    packing gives, the layer computes with ``F.linear`` (MKL), so no gradient is lost (``_PackedForward``).

    Packing reads and rewrites every weight, so the contexts nest: inside another one, only the layers whose
    weight or bias is no longer the tensor that was packed (``lib.ablation.orthogonalized`` puts new tensors in
    the layers it edits) are packed again, and on exit the outer packing is back. A weight edited in place while
    packed (``layer.weight.data.add_(...)``) is not seen: edit weights outside, or by replacing the tensor."""
    linears = _packable(model, gradients)
    if not linears or not _packing_fits(model, linears, gradients):
        yield 0
        return
    replaced = []
    for module in linears:
        current = vars(module).get("forward")
        if isinstance(current, _PackedForward) and current.packs(module, gradients):
            continue
        replaced.append((module, current))
        module.forward = _PackedForward(module, gradients)
    try:
        yield len(replaced)
    finally:
        for module, previous in reversed(replaced):
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@contextlib.contextmanager
def packed_products(model: torch.nn.Module, use: str, gradients: bool = False) -> Iterator[int]:
    """``packed_linears`` where ``packed_setting`` packs this ``use`` of the model ("generation", "attack": the
    robustness check's PGD, "training": the frozen weights while a LoRA trains, "measurement": the generation-free
    scores and activation capture), else nothing: how lib's forward passes multiply."""
    if use not in PACKED_USES["all"]:
        raise ValueError(f"Unknown use {use!r}; one of {PACKED_USES['all']}.")
    packs = use in PACKED_USES[packed_setting()]
    with packed_linears(model, gradients) if packs else contextlib.nullcontext(0) as packed:
        yield packed


def _tensor_state(tensor: torch.Tensor | None) -> tuple | None:
    return None if tensor is None else (tensor.data_ptr(), tensor._version, tuple(tensor.shape))


class _PackedForward:
    """A linear layer's forward on its weight packed for oneDNN (and its transpose when ``gradients``), holding the
    tensors it packed so that their memory cannot be reused while it lives (``packs`` compares addresses). Where
    autograd needs more than this packing gives (a gradient to the input without the transpose, or to a weight or
    bias that requires one), it computes the layer with ``F.linear`` instead, so gradients are never lost."""

    def __init__(self, module: torch.nn.Linear, gradients: bool):
        self.parameter, self.weight, self.bias = module.weight, module.weight.detach(), module.bias
        self.state = (_tensor_state(module.weight), _tensor_state(module.bias))
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 64)
        self.transposed = (torch.ops.mkldnn._reorder_linear_weight(self.weight.t().contiguous(), 64)
                           if gradients else None)

    def packs(self, module: torch.nn.Linear, gradients: bool) -> bool:
        """Whether this packing is of ``module``'s current weight and bias, with the transpose if ``gradients``."""
        return (module.weight is self.parameter and module.bias is self.bias
                and (self.transposed is not None or not gradients)
                and self.state == (_tensor_state(module.weight), _tensor_state(module.bias)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        trains = self.parameter.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if not torch.is_grad_enabled() or not (x.requires_grad or trains):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.transposed is not None and not trains:
            return _PackedLinear.apply(x, self.packed, self.transposed, self.bias)
        return torch.nn.functional.linear(x, self.parameter, self.bias)


class _PackedLinear(torch.autograd.Function):
    """``x W^T + b`` with W packed for oneDNN; the gradient reaches ``x`` only (``x' = g W``, W^T packed too)."""

    @staticmethod
    def forward(x, packed, transposed, bias):
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.transposed = inputs[2]

    @staticmethod
    def backward(ctx, grad):
        grad_x = torch.ops.mkldnn._linear_pointwise(grad.contiguous(), ctx.transposed, None, "none", [], "")
        return grad_x, None, None, None
