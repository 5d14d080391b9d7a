"""Directional ablation (Arditi et al. 2024), its weight-space twin, and activation addition.

Ablating orthonormal directions R ([k, d]) maps every residual vector a to a - (a R^T) R. Applied at every layer to
the block input, the attention output and the MLP output, it removes R from resid_pre, resid_mid and resid_post at
all positions. ``orthogonalized`` bakes the same projection into the weights that write to the residual stream
(embeddings, attention and MLP output projections), so it costs nothing per token and gives the same logits.

Two modes. ``"zero"`` (the paper's): the coordinates along R become 0. ``"mean"``: they become their mean m over
harmless reference prompts at that site (at the last prompt token, where directions are measured), a - (a R^T - m) R
(``lib.capture.site_statistics``). Zero ablation equals mean ablation plus a push -m R at every position: where a
direction has a component on a coordinate that is large and nearly constant at every position (SmolLM2's massive
activation on dim 507), that push is large, and zero ablation steers as well as removes. Mean ablation removes the
variation along R and keeps the offset, so it measures the direction alone.

Where the coordinates are set is a choice of its own (``sites``): at every write site (``WRITE_SITES``, the
default: the embedding and every attention and MLP output, so no block can write along R) or at the block inputs
only (``BLOCK_INPUTS``: each block starts from the reset coordinate, and its own attention and MLP writes along R
stay in the stream until the next block's input, the last block's until the unembedding). They differ in both
modes, by what a block's attention writes along R for its own MLP to read and by what the last block writes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lib.capture import site_statistics
from lib.hooks import WRITE_SITES, attached, check_layers, input_hook, write_site_hook
from lib.linalg import project_out
from lib.models import LoadedModel, ModelInfo


MODES = ("zero", "mean")
BLOCK_INPUTS = ("resid_pre",)  # ``sites`` that reset the coordinates at each block's input only

# The paper's self-attack (each model ablated with its own layer-14 direction; 520 prompts): refusal/valid/broken %.
PAPER_SELF_ATTACK = {"ssft": (20.38, 76.92, 2.69), "at": (38.08, 59.62, 2.31), "lat": (16.92, 80.96, 2.12)}

OUTPUT_PROJECTIONS = {"attn": ("o_proj", "out_proj", "dense", "c_proj"),
                      "mlp": ("down_proj", "fc2", "dense_4h_to_h", "c_proj", "w2")}


def check_directions(directions: torch.Tensor, d_model: int) -> torch.Tensor:
    """Validate ``[d]`` or ``[k, d]`` directions and return an orthonormal float32 ``[k, d]`` basis of their span."""
    directions = torch.as_tensor(directions)
    if directions.ndim == 1:
        directions = directions.unsqueeze(0)
    if directions.ndim != 2 or directions.shape[1] != d_model or directions.shape[0] == 0:
        raise ValueError(f"Directions must have shape [{d_model}] or [k, {d_model}] for this model; got "
                         f"{tuple(directions.shape)}. Was the direction taken from a model of another width?")
    directions = directions.detach().float().cpu()
    if not torch.isfinite(directions).all():
        raise ValueError("The direction contains NaN or infinite values; recompute it from finite activations.")
    if bool((directions.norm(dim=1) == 0).any()):
        raise ValueError("A direction is the zero vector; ablating it would do nothing. Check its source.")
    q, r = torch.linalg.qr(directions.double().T)
    if bool((r.diagonal().abs() < 1e-6 * directions.norm(dim=1).max()).any()):
        raise ValueError(f"The {directions.shape[0]} directions are linearly dependent; pass independent ones.")
    return q.T.float().contiguous()


def check_mode_name(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"Unknown ablation mode {mode!r}; choose 'zero' (the paper's) or 'mean'.")
    return mode


def check_sites(sites: Sequence[str]) -> tuple[str, ...]:
    """Validate a non-empty subset of ``WRITE_SITES`` and return it in their order."""
    unknown = [site for site in sites if site not in WRITE_SITES]
    if unknown or not sites:
        raise ValueError(f"Ablation sites must be a non-empty subset of {WRITE_SITES}; got {tuple(sites)}.")
    return tuple(site for site in WRITE_SITES if site in sites)


def check_mode(mode: str, means: torch.Tensor | None, info: ModelInfo) -> torch.Tensor | None:
    """Validate an ablation ``mode`` and, for ``"mean"``, the ``[n_layers, 3, d]`` site means it needs."""
    check_mode_name(mode)
    if mode == "zero":
        if means is not None:
            raise ValueError("Site means are only used by mode='mean'; drop them or set mode='mean'.")
        return None
    expected = (info.n_layers, len(WRITE_SITES), info.d_model)
    if means is None:
        raise ValueError("mode='mean' needs the target model's site means: pass "
                         "means=lib.capture.site_statistics(lm, harmless_prompts)['mean'].")
    means = torch.as_tensor(means).detach().float().cpu()
    if tuple(means.shape) != expected:
        raise ValueError(f"Site means must have shape {list(expected)} (layers, {WRITE_SITES}, d_model) for "
                         f"{info.family}/{info.variant}; got {list(means.shape)}. Were they taken from another model?")
    if not torch.isfinite(means).all():
        raise ValueError("The site means contain NaN or infinite values; recompute them.")
    return means


def mean_targets(basis: torch.Tensor, means: torch.Tensor | None) -> torch.Tensor | None:
    """The coordinates along ``basis`` ([k, d]) that mean ablation keeps at each site: ``[n_layers, 3, k]``."""
    return None if means is None else means.double() @ basis.double().T


def adds_outputs_unchanged(info: ModelInfo, layer: int) -> bool:
    """True when block ``layer`` adds its attention and MLP outputs to the residual stream as they are (pre-norm
    blocks: Llama, Mistral, Qwen, SmolLM, GPT-2), so that projecting those two outputs keeps the next block's input
    orthogonal to the ablated directions. False for blocks with other ``post_*`` modules (the post-norms of Gemma 2
    and OLMo 2, GPT-NeoX's residual dropouts), where the next block's input is projected too, to be safe."""
    mid = info.modules["mid"]
    return not any(name.startswith("post_") and name != mid for name, _ in info.layers[layer].named_children())


def ablation_hooks(info: ModelInfo, basis: torch.Tensor, layers=None, targets: torch.Tensor | None = None,
                   sites: Sequence[str] = WRITE_SITES) -> list:
    """Hooks that project ``basis`` out of ``sites`` (default: every block input, attention output and MLP output)
    of ``layers``; with ``targets`` (``[n_layers, 3, k]``, see ``mean_targets``) the coordinates along ``basis``
    are set to those values instead of zero (mean ablation).

    With every site hooked, a block input that is the previous ablated block's output is already ablated when that
    block ``adds_outputs_unchanged`` (its input, attention and MLP outputs are all projected; under mean ablation its
    coordinates are the sum of the three targets, which is the next input's target), so its hook is left out: 65
    hooks instead of 96 for a 32-layer Llama. On a GPU at small batches every hook is host time (launches), and
    this is what limits hooked generation, so each hook runs as few operators as it can (``projection_fn``) and no
    hook runs whose work is already done (see BENCHMARKS.md)."""
    sites = check_sites(sites)
    shared = projection_fn(basis) if targets is None else None
    chosen = check_layers(info, layers)
    hooks = []
    for layer in chosen:
        for slot, site in enumerate(WRITE_SITES):
            if site not in sites:
                continue
            if (site == "resid_pre" and sites == WRITE_SITES and layer - 1 in chosen
                    and adds_outputs_unchanged(info, layer - 1)):
                continue
            fn = shared or projection_fn(basis, targets[layer, slot])
            hooks.append(write_site_hook(info, site, layer, fn))
    return hooks


def projection_fn(basis: torch.Tensor, target: torch.Tensor | None = None):
    """``x -> x - (x B^T - t) B`` (``t`` = 0 when ``target`` is None) with the fewest operators per call (each is
    host time on a GPU at small batches).

    The basis is cast once per (device, dtype), not in every call: a host-to-device copy per call stalls the GPU
    queue at each hook. One direction is projected with three element-wise kernels, since a cuBLAS call costs
    several times the host time of an element-wise one; k > 1 directions with ``mm`` + ``addmm``; a target costs
    one subtraction more. Nothing else runs per call (no indexing: a ``b[0]`` view is an operator too)."""
    cast: dict[tuple, tuple] = {}

    def operands(hidden: torch.Tensor) -> tuple:
        b = basis.to(device=hidden.device, dtype=hidden.dtype)
        t = None if target is None else target.to(device=hidden.device, dtype=hidden.dtype)
        triple = cast[(hidden.device, hidden.dtype)] = (b[0].contiguous(), b, t) if len(b) == 1 else (
            b.T.contiguous(), b, t)
        return triple

    if len(basis) == 1:
        def project_one(hidden: torch.Tensor) -> torch.Tensor:
            vector, _, t = cast.get((hidden.device, hidden.dtype)) or operands(hidden)
            along = (hidden * vector).sum(-1, keepdim=True)
            return torch.addcmul(hidden, along if t is None else along - t, vector, value=-1)
        return project_one

    def project_many(hidden: torch.Tensor) -> torch.Tensor:
        b_t, b, t = cast.get((hidden.device, hidden.dtype)) or operands(hidden)
        flat = hidden.reshape(-1, hidden.shape[-1])
        coordinates = flat @ b_t
        return torch.addmm(flat, coordinates if t is None else coordinates - t, b, alpha=-1).view(hidden.shape)
    return project_many


@contextlib.contextmanager
def ablated(lm: LoadedModel, directions: torch.Tensor, layers=None, mode: str = "zero",
            means: torch.Tensor | None = None, sites: Sequence[str] = WRITE_SITES) -> Iterator[torch.Tensor]:
    """Within the block, every forward pass (generation included) runs with ``directions`` ablated at ``sites``
    (default: everywhere; ``mode="mean"``: to the ``[n_layers, 3, d]`` site ``means`` of
    ``lib.capture.site_statistics``)."""
    basis = check_directions(directions, lm.info.d_model)
    targets = mean_targets(basis, check_mode(mode, means, lm.info))
    with attached(ablation_hooks(lm.info, basis, layers, targets, sites)):
        yield basis


def _output_projection(module: nn.Module, role: str) -> nn.Linear:
    for name in OUTPUT_PROJECTIONS[role]:
        candidate = getattr(module, name, None)
        if isinstance(candidate, nn.Linear):
            return candidate
    raise ValueError(f"No nn.Linear output projection named {OUTPUT_PROJECTIONS[role]} in {type(module).__name__}; "
                     "weight orthogonalisation supports Llama-style blocks (use `ablated` hooks instead).")


@contextlib.contextmanager
def orthogonalized(lm: LoadedModel, directions: torch.Tensor, mode: str = "zero",
                   means: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Project ``directions`` out of every weight that writes to the residual stream; restore them on exit.

    Mean ablation (``mode="mean"``) adds back each site's target coordinates as a bias along the directions: on
    the embedding rows (the first block's input) and on every attention and MLP output projection (a bias is added
    where the layer has none). Tied input/output embeddings are untied for the duration, so the unembedding stays
    as it was (as with hooks).

    The edited weights are new tensors and the originals are put back on exit, not copies of them: nothing is
    cloned (SmolLM2's embedding is 113 MB, and a tied unembedding keeps the original embedding tensor itself).
    """
    model, info = lm.model, lm.info
    basis = check_directions(directions, info.d_model)
    targets = mean_targets(basis, check_mode(mode, means, info))
    embedding = model.get_input_embeddings()
    output_embedding = model.get_output_embeddings()
    tied = output_embedding is not None and output_embedding.weight is embedding.weight
    writers = [(_output_projection(info.submodule(layer, role), role), layer, WRITE_SITES.index(f"{role}_out"))
               for layer in range(info.n_layers) for role in ("attn", "mlp")]
    saved = [(embedding.weight, embedding.weight.data)] + [(w.weight, w.weight.data) for w, _, _ in writers]
    saved += [(w.bias, w.bias.data) for w, _, _ in writers if w.bias is not None]
    biasless = [w for w, _, _ in writers if w.bias is None] if targets is not None else []
    try:
        if tied:
            output_embedding.weight = nn.Parameter(embedding.weight.data, requires_grad=False)
        # ordinary tensors even when the caller is in inference mode, so that autograd can run on the edited model
        with torch.inference_mode(False), torch.no_grad():
            embedding.weight.data = project_out(embedding.weight.data, basis)  # rows are residual vectors
            if targets is not None:
                embedding.weight.data += _offset(basis, targets[0, 0], embedding.weight)
            for writer, layer, slot in writers:
                b = basis.to(writer.weight.device, writer.weight.dtype)
                writer.weight.data = writer.weight.data - b.T @ (b @ writer.weight.data)  # W <- (I - B^T B) W
                if writer.bias is not None:
                    writer.bias.data = project_out(writer.bias.data, basis)
                if targets is not None:
                    offset = _offset(basis, targets[layer, slot], writer.weight)
                    if writer.bias is None:
                        writer.bias = nn.Parameter(offset, requires_grad=False)
                    else:
                        writer.bias.data += offset
        yield basis
    finally:
        for writer in biasless:
            writer.bias = None
        for parameter, original in saved:
            parameter.data = original
        if tied:
            output_embedding.weight = embedding.weight


def _offset(basis: torch.Tensor, target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The residual vector ``t B`` whose coordinates along ``basis`` are ``target``, as ``like``'s device and dtype."""
    return (target.double() @ basis.double()).to(device=like.device, dtype=like.dtype)


@contextlib.contextmanager
def added(lm: LoadedModel, direction: torch.Tensor, layer: int, coefficient: float = 1.0) -> Iterator[None]:
    """Activation addition: add ``coefficient * direction`` to the residual stream entering ``layer``, at all
    positions (with the unnormalised mean difference and coefficient 1 this induces refusal, Arditi et al.)."""
    direction = torch.as_tensor(direction).detach().float()
    if direction.shape != (lm.info.d_model,):
        raise ValueError(f"The added direction must have shape [{lm.info.d_model}], got {tuple(direction.shape)}.")
    if not torch.isfinite(direction).all():
        raise ValueError("The added direction contains NaN or infinite values.")
    check_layers(lm.info, [layer])
    fn = lambda hidden: hidden + coefficient * direction.to(hidden.device, hidden.dtype)  # noqa: E731
    with attached([(lm.info.layers[layer], "pre", input_hook(fn))]):
        yield


def orthogonalizable(lm: LoadedModel) -> bool:
    """True when the residual writers hold plain floating-point weights (not e.g. 4-bit quantised ones), so that
    ``orthogonalized`` can edit them; otherwise ablation falls back to hooks."""
    try:
        writers = [_output_projection(lm.info.submodule(0, role), role) for role in ("attn", "mlp")]
    except ValueError:
        return False
    weights = [lm.model.get_input_embeddings().weight] + [w.weight for w in writers]
    return all(type(w) in (torch.Tensor, nn.Parameter) and w.dtype.is_floating_point for w in weights)


@dataclass(frozen=True)
class Intervention:
    """One experimental condition for generation or scoring: ``"ablate"`` (project ``directions`` out at ``sites``,
    by weight orthogonalisation where the weights allow it, else by hooks; ``mode`` "zero" or "mean", the latter
    with the target model's site ``means``) or ``"add"`` (activation addition of ``directions`` at ``layer``).
    ``sites``: where an ablation sets the coordinates (every write site, or ``BLOCK_INPUTS``; only the default
    can be baked into weights). ``key()`` identifies it for caching by the exact tensor values."""

    kind: str
    directions: torch.Tensor
    layer: int | None = None
    coefficient: float = 1.0
    label: str = ""
    mode: str = "zero"
    means: torch.Tensor | None = None
    sites: tuple[str, ...] = WRITE_SITES

    def __post_init__(self):
        if self.kind not in ("ablate", "add"):
            raise ValueError(f"Unknown intervention kind {self.kind!r}; use 'ablate' or 'add'.")
        if self.kind == "add" and self.layer is None:
            raise ValueError("Activation addition needs the layer whose input receives the direction.")
        mean = check_mode_name(self.mode) == "mean"
        if mean != (self.means is not None) or (self.kind == "add" and mean):
            raise ValueError("Site means go with kind='ablate', mode='mean' (and only there): see ablation_means.")
        object.__setattr__(self, "sites", check_sites(self.sites))  # a list or any order: one canonical tuple
        if self.sites != WRITE_SITES and self.kind == "add":
            raise ValueError("Ablation sites go with kind='ablate'; activation addition acts at one layer's input.")

    def key(self) -> str:
        values = self.directions.detach().float().cpu().contiguous().numpy().tobytes()
        settings = (self.kind, tuple(self.directions.shape), self.layer, self.coefficient)
        if self.mode == "mean":
            values += self.means.detach().float().cpu().contiguous().numpy().tobytes()
            settings += ("mean",)
        if self.sites != WRITE_SITES:
            settings += self.sites
        digest = hashlib.sha256(values + repr(settings).encode()).hexdigest()[:16]
        return f"{self.kind}-{digest}" if self.mode == "zero" else f"{self.kind}-mean-{digest}"

    def applied(self, lm: LoadedModel):
        if self.kind == "ablate":
            if self.sites == WRITE_SITES and orthogonalizable(lm):
                return orthogonalized(lm, self.directions, self.mode, self.means)
            return ablated(lm, self.directions, None, self.mode, self.means, self.sites)
        return added(lm, self.directions, self.layer, self.coefficient)


def ablation_means(lm: LoadedModel, mode: str = "zero", reference: Sequence[str] | None = None,
                   batch_size: int = 16) -> torch.Tensor | None:
    """What an ablation in ``mode`` needs from the model it runs in: None for "zero"; for "mean", the site means of
    its residual stream at the last token of the harmless ``reference`` prompts (``lib.capture.site_statistics``,
    cached): the position where refusal directions are measured, so that mean ablation moves a harmful prompt's
    coordinate there to where a harmless prompt's sits, as the difference in means defines the direction."""
    if check_mode_name(mode) == "zero":
        return None
    if not reference:
        raise ValueError("mode='mean' needs harmless reference prompts whose mean activations the ablation keeps "
                         "(e.g. lib.data.reference_prompts(dataset)).")
    return site_statistics(lm, list(reference), batch_size, "last", desc=f"{lm.info.variant} site means")["mean"]
