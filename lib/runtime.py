"""Device, dtype, seed, progress-bar and batch-size helpers shared by every stage."""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm import tqdm

T = TypeVar("T")

PROGRESS_ENV = "REFUSAL_BOOK_PROGRESS"
PACKED_ENV = "REFUSAL_BOOK_PACKED_LINEAR"  # where lib multiplies by packed weights: see packed_setting
# which of lib's forward passes each setting packs (generation; the robustness check's PGD; scores and capture)
PACKED_USES = {"0": (), "1": ("generation", "attack"), "all": ("generation", "attack", "measurement")}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` means CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available here; use device='cpu' or 'auto'.")
    return resolved


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"`` means bfloat16 on CUDA and float32 on CPU (CPU runs must be byte-identical across reruns)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of 'auto', {', '.join(repr(n) for n in names)}.")
    return names[dtype]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so that every stochastic step is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress_enabled() -> bool:
    """Progress bars are on unless ``REFUSAL_BOOK_PROGRESS=0`` (the book runner and nbval set it)."""
    return os.environ.get(PROGRESS_ENV, "1") != "0"


def progress(iterable: Iterable[T], desc: str, total: int | None = None, show: bool | None = None) -> Iterator[T]:
    """A tqdm bar over ``iterable`` that stays silent when progress is disabled."""
    enabled = progress_enabled() if show is None else show
    return iter(tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False))


class ChapterLogHandler(logging.FileHandler):
    """The file handler ``log_to_file`` installs: a later call (the chapter re-run in the same kernel) replaces it."""


def log_to_file(path: str | Path) -> Path:
    """From now on in this process, send Python warnings and every library's log records to ``path``, started
    afresh, instead of stderr: every logger's stderr handler (torch's, and transformers' and huggingface_hub's, made
    here by importing them) gives way to one file handler, on the root logger and on those loggers that do not
    propagate. A chapter calls it first (``lib.parameters.check``): whatever reaches a notebook's stderr becomes a
    stored output, and a line that appears only on some hosts, under load or on a cold cache (a once-per-process
    warning, a library's log line) fails nbval there. Nothing is lost: the runner names the file when not empty."""
    for module in ("huggingface_hub.utils.logging", "transformers.utils.logging"):
        importlib.import_module(module)  # each adds its own stderr handler when first imported: replace it now

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = ChapterLogHandler(path, delay=True, encoding="utf-8")  # created at the first record only
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    for logger in [root] + [logger for logger in root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]:
        replaced = [h for h in logger.handlers if isinstance(h, ChapterLogHandler) or _writes_to_stderr(h)]
        for old in replaced:
            logger.removeHandler(old)
            old.close()
        if logger is root or (replaced and not logger.propagate):
            logger.addHandler(handler)
    path.unlink(missing_ok=True)
    logging.captureWarnings(True)
    return path


def _writes_to_stderr(handler: logging.Handler) -> bool:
    """A plain stream handler on this process's ``sys.stderr`` (in a kernel: the cell's stderr; the kernel's own log
    writes to ``sys.__stderr__`` and is left alone)."""
    return type(handler) is logging.StreamHandler and handler.stream is sys.stderr


# --- batch size ------------------------------------------------------------------------------------------------------
# ``auto_batch_size(lm, max_prompt_tokens, max_new_tokens, device)`` estimates what one sequence needs from the model's
# shapes (KV cache over prompt + new tokens, the prefill's activations and attention scores, the logits) and divides
# the memory free now (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` in /proc/meminfo, else
# ``os.sysconf``) by it, keeping a margin. The result is rounded down to a power of two, so that a small change in
# free memory does not change how prompts are grouped (batch composition changes padding, and with it the last bits
# of CPU results), and capped: on a CPU, throughput stops improving long before memory runs out.

CPU_CAP = 32  # on 2 CPU cores, 32 prompts per batch already saturate the matmuls (lib.generation's default)
CUDA_CAP = 512
CPU_FRACTION = 0.5  # CPU RAM is shared with the rest of the machine (notebooks, a second process)
CUDA_FRACTION = 0.85  # leave room for the CUDA context, fragmentation and cuBLAS workspaces
SAFETY = 1.25  # allocator slack and temporaries the estimate does not itemise


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free for new tensors on ``device`` now: CUDA ``mem_get_info`` plus what PyTorch's caching allocator
    holds but no tensor uses (a large earlier batch leaves it reserved: without it the batch after a big run came out
    a third of the first's on an H200); CPU ``MemAvailable`` from /proc/meminfo (Linux), else free physical pages
    from ``os.sysconf``."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _shapes(model) -> dict[str, int]:
    config = model.config
    config = getattr(config, "text_config", None) or config
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    return {"layers": config.num_hidden_layers, "d": d_model, "heads": n_heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or n_heads,
            "head_dim": getattr(config, "head_dim", None) or d_model // n_heads,
            "ffn": getattr(config, "intermediate_size", None) or 4 * d_model, "vocab": config.vocab_size}


def sequence_bytes(lm, max_prompt_tokens: int, max_new_tokens: int, kv_cache: bool = True) -> int:
    """Estimated peak bytes one sequence adds (weights excluded), before the safety margin.

    With ``kv_cache`` (``generate``): the cache over prompt + new tokens, the prefill's activations over the prompt
    (residual, attention and MLP temporaries, eager attention scores) and float32 next-token logits.
    ``max_new_tokens=0`` is a plain forward pass (capture), which computes logits at every prompt position.
    Without ``kv_cache`` (the paper's recompute loop): each step is a full forward over prompt + new tokens.
    """
    if max_prompt_tokens < 1 or max_new_tokens < 0:
        raise ValueError(f"max_prompt_tokens ({max_prompt_tokens}) must be >= 1 and max_new_tokens "
                         f"({max_new_tokens}) >= 0.")
    s = _shapes(lm.model)
    size = torch.finfo(lm.info.dtype).bits // 8 if lm.info.dtype.is_floating_point else 4
    total = max_prompt_tokens + max_new_tokens
    forward_tokens = max_prompt_tokens if kv_cache else total
    activations = forward_tokens * (6 * s["d"] + 3 * s["ffn"]) * size
    scores = 2 * s["heads"] * forward_tokens * forward_tokens * size  # scores + softmax (eager worst case)
    if max_new_tokens == 0 or not kv_cache:
        logits = forward_tokens * s["vocab"] * max(size, 4)  # every position's logits (upcast when sliced)
    else:
        logits = 2 * s["vocab"] * 4  # generate keeps only the next-token logits, in float32
    cache = 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * total * size if kv_cache and max_new_tokens else 0
    return int(activations + scores + logits + cache)


def auto_batch_size(lm, max_prompt_tokens: int, max_new_tokens: int, device: str | torch.device | None = None, *,
                    available_bytes: int | None = None, fraction: float | None = None, cap: int | None = None,
                    kv_cache: bool = True) -> int:
    """The largest power-of-two batch whose estimated memory fits ``fraction`` of the free memory on ``device``
    (default: the model's device), capped at ``cap`` (CPU 32, CUDA 512); at least 1.

    ``available_bytes`` overrides the measurement (tests, or a budget of your own)."""
    device = torch.device(device) if device is not None else lm.info.device
    if available_bytes is None:
        available_bytes = available_memory(device)
    if fraction is None:
        fraction = CUDA_FRACTION if device.type == "cuda" else CPU_FRACTION
    if cap is None:
        cap = CUDA_CAP if device.type == "cuda" else CPU_CAP
    if not 0 < fraction <= 1 or cap < 1:
        raise ValueError(f"fraction must be in (0, 1] and cap >= 1; got fraction={fraction}, cap={cap}.")
    per_sequence = SAFETY * sequence_bytes(lm, max_prompt_tokens, max_new_tokens, kv_cache)
    fits = int(available_bytes * fraction // per_sequence)
    if fits < 1:
        return 1
    return min(cap, 1 << int(math.log2(fits)))


def balanced(n_items: int, batch_size: int) -> int:
    """The smallest batch size that needs as few batches as ``batch_size`` does for ``n_items`` (520 prompts at
    512 -> 260, two equal batches instead of 512 + 8)."""
    if n_items < 1 or batch_size < 1:
        raise ValueError(f"n_items ({n_items}) and batch_size ({batch_size}) must be >= 1.")
    n_batches = math.ceil(n_items / batch_size)
    return math.ceil(n_items / n_batches)


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
    completions, judged rates) came out the same as with MKL in every chapter and on both kernels (AVX-512, AVX2).
    ``all``: also the generation-free scores and activation capture, about 1.6x faster again, but the numbers the
    chapters print from them move in the last bits, and a few that sit on a rounding boundary print differently on
    oneDNN's AVX-512 and AVX2 kernels (``BENCHMARKS.md``, "Every forward pass"), so the committed chapters use 1.
    ``0``: MKL everywhere."""
    value = os.environ.get(PACKED_ENV, "1")
    if value not in PACKED_USES:
        raise ValueError(f"{PACKED_ENV}={value!r}: use 1 (the default: generation and the PGD attacks multiply by "
                         "weights packed for oneDNN), all (scores and capture too; their printed digits move) or 0 "
                         "(the default kernel everywhere, MKL on x86).")
    return value


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, gradients: bool = False) -> Iterator[int]:
    """Computation in which every ``nn.Linear`` of a float32 CPU model multiplies by a weight that oneDNN has
    re-laid out once for its kernels (``torch.ops.mkldnn``), instead of the default kernel (MKL) re-packing the
    weight on every call. On a 2-core AMD EPYC host with AVX-512 one thread multiplied a decode step's shapes 1.9x
    to 3.0x faster this way (oneDNN's AVX-512 kernel ~180 GFLOP/s, MKL ~80), and greedy generation of the book's
    workloads ran 1.85x faster at one thread (a lane of ``make test``); on an AVX2-only host 1.05x
    (``BENCHMARKS.md``, ``make bench --sections products,levers``). The products are not bit-identical to MKL's
    (logits move by ~1e-4); lib computes with them where ``packed_setting`` says. A no-op elsewhere (CUDA,
    bfloat16), and when the packed copies would take more than half the free memory (a large float32 model on a
    CPU). Yields the number of layers it packed.

    ``gradients=True`` also packs each weight's transpose, so that autograd can carry a gradient back through the
    layer to its input with oneDNN too (a PGD attack on the activations); the weights themselves get none, so a layer
    whose weight or bias requires a gradient (training) keeps its own forward. Wherever autograd needs more than a
    packing gives, the layer computes with ``F.linear`` (MKL), so no gradient is lost (``_PackedForward``).

    Packing SmolLM2 takes about 0.4 s at one thread, so the contexts nest: inside another one, only the layers whose
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
    robustness check's PGD, "measurement": the generation-free scores and activation capture), else nothing: how
    lib's forward passes multiply."""
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
