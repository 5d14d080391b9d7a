"""Directional ablation (Arditi et al. 2024), its weight-space twin, and activation addition.

Ablating orthonormal directions R ([k, d]) maps every residual vector a to a - (a R^T) R. Applied at every layer to
the block input, the attention output and the MLP output, it removes R from resid_pre, resid_mid and resid_post at
all positions. ``orthogonalized`` bakes the same projection into the weights that write to the residual stream
(embeddings, attention and MLP output projections), so it costs nothing per token and gives the same logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lib.hooks import attached, check_layers, input_hook, output_hook
from lib.models import LoadedModel, ModelInfo

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


def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x - (x B^T) B for an orthonormal basis B [k, d] (cast to x's dtype and device)."""
    basis = basis.to(device=x.device, dtype=x.dtype)
    return x - (x @ basis.T) @ basis


def ablation_hooks(info: ModelInfo, basis: torch.Tensor, layers=None) -> list:
    """Hooks that project ``basis`` out of every block input, attention output and MLP output."""
    fn = lambda hidden: project_out(hidden, basis)  # noqa: E731
    hooks = []
    for layer in check_layers(info, layers):
        hooks.append((info.layers[layer], "pre", input_hook(fn)))
        hooks.append((info.submodule(layer, "attn"), "post", output_hook(fn)))
        hooks.append((info.submodule(layer, "mlp"), "post", output_hook(fn)))
    return hooks


@contextlib.contextmanager
def ablated(lm: LoadedModel, directions: torch.Tensor, layers=None) -> Iterator[torch.Tensor]:
    """Within the block, every forward pass (generation included) runs with ``directions`` ablated everywhere."""
    basis = check_directions(directions, lm.info.d_model)
    with attached(ablation_hooks(lm.info, basis, layers)):
        yield basis


def _output_projection(module: nn.Module, role: str) -> nn.Linear:
    for name in OUTPUT_PROJECTIONS[role]:
        candidate = getattr(module, name, None)
        if isinstance(candidate, nn.Linear):
            return candidate
    raise ValueError(f"No nn.Linear output projection named {OUTPUT_PROJECTIONS[role]} in {type(module).__name__}; "
                     "weight orthogonalisation supports Llama-style blocks (use `ablated` hooks instead).")


@contextlib.contextmanager
def orthogonalized(lm: LoadedModel, directions: torch.Tensor) -> Iterator[torch.Tensor]:
    """Project ``directions`` out of every weight that writes to the residual stream; restore them on exit.

    Tied input/output embeddings are untied for the duration, so the unembedding stays as it was (as with hooks).
    """
    model, info = lm.model, lm.info
    basis = check_directions(directions, info.d_model)
    embedding = model.get_input_embeddings()
    output_embedding = model.get_output_embeddings()
    tied = output_embedding is not None and output_embedding.weight is embedding.weight
    writers = [_output_projection(info.submodule(layer, role), role)
               for layer in range(info.n_layers) for role in ("attn", "mlp")]
    saved = [(embedding.weight, embedding.weight.data.clone())]
    saved += [(w.weight, w.weight.data.clone()) for w in writers]
    saved += [(w.bias, w.bias.data.clone()) for w in writers if w.bias is not None]
    try:
        if tied:
            output_embedding.weight = nn.Parameter(embedding.weight.data.clone(), requires_grad=False)
        with torch.no_grad():
            embedding.weight.data = project_out(embedding.weight.data, basis)  # rows are residual vectors
            for writer in writers:
                b = basis.to(writer.weight.device, writer.weight.dtype)
                writer.weight.data -= b.T @ (b @ writer.weight.data)  # W <- (I - B^T B) W, W is [d, in]
                if writer.bias is not None:
                    writer.bias.data = project_out(writer.bias.data, basis)
        yield basis
    finally:
        for parameter, original in saved:
            parameter.data = original
        if tied:
            output_embedding.weight = embedding.weight


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
