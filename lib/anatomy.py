"""Anatomy of an ablation: massive activations, where each direction sits on them, and what zero ablation does.

Some models carry *massive activations* (Sun et al. 2024): a few residual coordinates that are orders of magnitude
larger than the rest, huge at the first token and large and nearly constant at every other position. A projection
``x . r`` then carries a constant offset ``sum_c mu_c r_c`` from those coordinates, so zero ablation
``x - (x . r) r`` also adds ``-(mu . r) r`` at every position of every site: a steering push along ``-r`` whose
size depends on the direction's few coordinates there, not on how well it captures refusal. The functions here
measure that offset, compare directions beyond their raw cosine, and run the experiments that separate the push
from the removal (a coordinate swap, the first token left out, mean ablation, a control direction with the same
push), and the two definitions of mean ablation (coordinates reset at every write site, or at the block inputs
only) with the sites whose writes separate them. The statistics come from ``lib.capture.site_statistics``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pandas as pd
import torch

from lib.ablation import BLOCK_INPUTS, ablated, check_directions, projection_fn
from lib.hooks import WRITE_SITES, attached, write_site_hook
from lib.linalg import unit
from lib.models import LoadedModel
from lib.packed import packed_products
from lib.progress import progress
from lib.scores import kl_divergence, next_token_log_probs, refusal_score_from
from lib.stats import bootstrap_indices, bootstrap_mean_interval


RESID_PRE = WRITE_SITES.index("resid_pre")


def coordinate_std(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Standard deviation of every coordinate over the positions after the first, ``[n_layers, 3, d]``."""
    return (stats["mean_square"].double() - stats["mean"].double().square()).clamp_min(0).sqrt().float()


def norms_by_layer(stats: dict[str, torch.Tensor]):
    """Per layer, the residual stream entering it: the first token's norm, the root-mean-square norm at the other
    positions, and the share of that mean square on the single largest coordinate. A DataFrame."""
    pre_square = stats["mean_square"][:, RESID_PRE].double()  # [layers, d]
    rows = []
    for layer in range(pre_square.shape[0]):
        total = float(pre_square[layer].sum())
        top = int(pre_square[layer].argmax())
        rows.append({"layer": layer, "first token norm": float(stats["first"][layer, RESID_PRE].norm()),
                     "other tokens RMS norm": total ** 0.5, "largest coordinate": top,
                     "its share of the mean square": float(pre_square[layer, top]) / total if total else 0.0})
    return pd.DataFrame(rows)


def massive_coordinates(stats: dict[str, torch.Tensor], layer: int, top: int = 5,
                        last: dict[str, torch.Tensor] | None = None):
    """The ``top`` coordinates of the stream entering ``layer`` with the largest mean magnitude over the positions
    in ``stats`` (``site_statistics(..., positions="rest")``): their value at the first token, their mean and
    standard deviation there, that mean in units of the median coordinate's standard deviation, and (given the
    ``last``-token statistics) their mean at the last token. A DataFrame indexed by coordinate."""
    mean = stats["mean"][layer, RESID_PRE]
    std = coordinate_std(stats)[layer, RESID_PRE]
    first = stats["first"][layer, RESID_PRE]
    median_std = float(std.median())
    order = torch.argsort(mean.abs(), descending=True, stable=True)[:top].tolist()
    rows = []
    for c in order:
        row = {"coordinate": c, "first token": float(first[c]), "mean (other tokens)": float(mean[c]),
               "std (other tokens)": float(std[c]), "mean / median std": float(mean[c]) / median_std}
        if last is not None:
            row["mean (last token)"] = float(last["mean"][layer, RESID_PRE, c])
        rows.append(row)
    return pd.DataFrame(rows).set_index("coordinate")


def direction_offsets(directions: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], layer: int,
                      coordinates: Sequence[int]):
    """For each named unit direction: its value on each of ``coordinates``, its harmless mean projection ``m``
    at the input of ``layer`` over the positions of ``stats`` (at the last token: what zero ablation removes there,
    on top of the variation) and the part of ``m`` that those coordinates contribute. A DataFrame indexed by
    direction."""
    mean = stats["mean"][layer, RESID_PRE].double()
    rows = []
    for name, direction in directions.items():
        r = _unit(direction)
        row = {f"r[{c}]": float(r[c]) for c in coordinates}
        row["mean projection m"] = float(mean @ r)
        row["m from these coordinates"] = float(sum(mean[c] * r[c] for c in coordinates))
        rows.append({"direction": name, **row})
    return pd.DataFrame(rows).set_index("direction")


def similarities(directions: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], layer: int,
                 activations: torch.Tensor, reference: str):
    """How alike each direction is to ``reference``, three ways: the raw cosine; the cosine after scaling each
    coordinate by its standard deviation (``r * sigma``: how the two projections weigh the stream's variation);
    and the correlation across ``activations`` (``[n, d]``, e.g. last-token activations of harmful and harmless
    prompts at ``layer``) of the projections ``x . r``. Plus the gap between their harmless mean projections.
    A DataFrame indexed by direction."""
    sigma = coordinate_std(stats)[layer, RESID_PRE].double()
    mean = stats["mean"][layer, RESID_PRE].double()
    acts = activations.double()
    base = _unit(directions[reference])
    rows = []
    for name, direction in directions.items():
        r = _unit(direction)
        projections = torch.stack([acts @ base, acts @ r])
        rows.append({"direction": name, "cosine": float(base @ r),
                     "cosine, std-scaled": float(torch.nn.functional.cosine_similarity(base * sigma, r * sigma, 0)),
                     "projection correlation": float(torch.corrcoef(projections)[0, 1]),
                     "mean projection gap": float(mean @ r - mean @ base)})
    return pd.DataFrame(rows).set_index("direction")


def swap_coordinate(direction: torch.Tensor, donor: torch.Tensor, coordinate: int) -> torch.Tensor:
    """``direction`` (unit) with its value on ``coordinate`` replaced by the unit ``donor``'s, renormalised."""
    swapped = _unit(direction).clone()
    swapped[coordinate] = _unit(donor)[coordinate]
    return (swapped / swapped.norm()).float()


def matched_control(direction: torch.Tensor, mean: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random unit direction orthogonal to ``direction`` with the same mean projection ``mean . r`` (``mean``: the
    harmless mean of the stream at the attack layer): zero-ablating it gives the stream the same constant push
    at that site, while removing nothing that ``direction`` carries."""
    r, mean = _unit(direction), mean.double()
    target = float(mean @ r)
    along = mean - (mean @ r) * r
    e1 = along / along.norm()
    if abs(target) > along.norm():
        raise ValueError("No unit direction orthogonal to the source has its mean projection: the mean is too small.")
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(r.shape[0], generator=generator, dtype=torch.float64)
    w = w - (w @ r) * r - (w @ e1) * e1
    w = w / w.norm()
    a = target / float(along.norm())
    return (a * e1 + (1 - a * a) ** 0.5 * w).float()


@contextlib.contextmanager
def ablated_except_first(lm: LoadedModel, direction: torch.Tensor) -> Iterator[None]:
    """Zero ablation of ``direction`` at every layer and site, but not at each prompt's first token (the start token
    that carries the largest massive activations): tells an effect of the first token from one of the offset at
    every other position. For single forward passes (scores), not generation."""
    basis = check_directions(direction, lm.info.d_model)
    project = projection_fn(basis)
    state: dict[str, torch.Tensor] = {}

    def remember_first(module, args, kwargs):
        mask = kwargs["attention_mask"]
        state["first"] = mask.long().argmax(dim=1)  # left padding: the first real token
        state["width"] = mask.shape[1]
        return None

    def keep_first(hidden: torch.Tensor) -> torch.Tensor:
        projected = project(hidden)
        # a pass that continues a cached prefix sees only the last positions of the attention mask
        first = state["first"].to(hidden.device) - (state["width"] - hidden.shape[1])
        rows = torch.nonzero(first >= 0).flatten()
        projected[rows, first[rows]] = hidden[rows, first[rows]]
        return projected

    hooks = [(lm.model, "pre", remember_first)]
    hooks += [write_site_hook(lm.info, site, layer, keep_first) for layer in range(lm.info.n_layers)
              for site in WRITE_SITES]
    with attached(hooks):
        yield


def dissection_conditions(directions: dict[str, torch.Tensor], target: str, means: torch.Tensor, mean: torch.Tensor,
                          coordinate: int, seed: int = 0) -> dict:
    """The anatomy chapter's ablation conditions in ``target``, for ``condition_scores``: none; then per source
    direction zero and mean ablation (``means``: the target's site means), zero ablation with the first token
    spared, and zero ablation of its matched control (``mean``: the harmless mean at the attack layer); then, for
    each other source, the target's and that source's directions with their values on ``coordinate`` swapped."""
    conditions = {"none": None}
    for s, r in directions.items():
        conditions[f"{s}: zero"] = lambda lm, r=r: ablated(lm, r)
        conditions[f"{s}: mean"] = lambda lm, r=r: ablated(lm, r, mode="mean", means=means)
        conditions[f"{s}: zero, first token spared"] = lambda lm, r=r: ablated_except_first(lm, r)
        conditions[f"{s}: matched control"] = lambda lm, r=matched_control(r, mean, seed): ablated(lm, r)
    for s in [s for s in directions if s != target]:
        for a, b in ((target, s), (s, target)):
            swapped = swap_coordinate(directions[a], directions[b], coordinate)
            conditions[f"{a} with {b}'s coordinate"] = lambda lm, r=swapped: ablated(lm, r)
    return conditions


MEAN_DEFINITIONS = ("every write site", "block inputs", "block inputs + attention outputs",
                    "block inputs + MLP outputs", "block inputs + last block's writes")


@contextlib.contextmanager
def mean_ablated_at(lm: LoadedModel, direction: torch.Tensor, means: torch.Tensor, definition: str) -> Iterator[None]:
    """Mean ablation of ``direction`` by one of ``MEAN_DEFINITIONS``: the coordinate reset to the target's harmless
    mean at every write site (the embedding and every attention and MLP output), at the block inputs only (each
    block's own writes along it stay until the next block's input, the last block's until the unembedding), or at
    the block inputs plus one kind of write (every attention output, every MLP output, or the last block's two
    writes): which writes, left in place, make the two definitions differ."""
    extra = {"every write site": None, "block inputs": None,
             "block inputs + attention outputs": (None, ("attn_out",)),
             "block inputs + MLP outputs": (None, ("mlp_out",)),
             "block inputs + last block's writes": ([lm.info.n_layers - 1], ("attn_out", "mlp_out"))}
    if definition not in extra:
        raise ValueError(f"Unknown mean-ablation definition {definition!r}; choose from {MEAN_DEFINITIONS}.")
    with contextlib.ExitStack() as stack:
        stack.enter_context(ablated(lm, direction, mode="mean", means=means,
                                    sites=WRITE_SITES if definition == MEAN_DEFINITIONS[0] else BLOCK_INPUTS))
        if extra[definition] is not None:
            layers, sites = extra[definition]
            stack.enter_context(ablated(lm, direction, layers, mode="mean", means=means, sites=sites))
        yield


OTHER_POSITIONS = "every write site, means of every token but the first"
MIN_GAP = 1e-3  # a gap between the definitions' drops below this (refusal-score units) has no shares to split


def definition_conditions(directions: dict[str, torch.Tensor], means: torch.Tensor,
                          other_means: torch.Tensor | None = None) -> dict:
    """Per source direction, mean ablation by each of ``MEAN_DEFINITIONS`` (``"<s>: mean, <definition>"``), for
    ``condition_scores``; ``means``: the target's site means at the last prompt token. With ``other_means`` (site
    means over other positions, e.g. every token but the first), also mean ablation at every write site to those
    (``OTHER_POSITIONS``): the position the means are taken at is a choice of the definition too."""
    conditions = {f"{s}: mean, {definition}": (lambda lm, r=r, d=definition: mean_ablated_at(lm, r, means, d))
                  for s, r in directions.items() for definition in MEAN_DEFINITIONS}
    if other_means is not None:
        conditions.update({f"{s}: mean, {OTHER_POSITIONS}": (lambda lm, r=r: ablated(lm, r, mode="mean",
                                                                                     means=other_means))
                           for s, r in directions.items()})
    return conditions


def definition_summary(scores, sources: Sequence[str]):
    """From ``condition_scores`` of ``definition_conditions`` (and "none"): per source, the drop in mean refusal
    score under each definition, for each of the three partial definitions the share of the gap between the
    block-input and the every-write-site drops that resetting that kind of write as well closes (1: those writes
    are the whole difference; 0: none of it; NaN where the two definitions agree within ``MIN_GAP``), and the drop
    with the other positions' means where scored."""
    score = scores["refusal score"]
    rows = []
    for s in sources:
        drops = {d: score["none"] - score[f"{s}: mean, {d}"] for d in MEAN_DEFINITIONS}
        gap = drops["every write site"] - drops["block inputs"]
        closes = {f"closes of the gap: {d.removeprefix('block inputs + ')}":
                  (drops[d] - drops["block inputs"]) / gap if abs(gap) > MIN_GAP else float("nan")
                  for d in MEAN_DEFINITIONS[2:]}
        other = f"{s}: mean, {OTHER_POSITIONS}"
        elsewhere = {f"drop, {OTHER_POSITIONS}": score["none"] - score[other]} if other in score else {}
        rows.append({"source": s, **{f"drop, {d}": v for d, v in drops.items()}, **closes, **elsewhere})
    return pd.DataFrame(rows).set_index("source")


def describe_definitions(summary, target: str) -> str:
    """The definitions' summary in sentences: the drops under each definition, and which writes close the gap."""
    drops = {d: ", ".join(f"{s} {summary.loc[s, f'drop, {d}']:.1f}" for s in summary.index)
             for d in MEAN_DEFINITIONS[:2]}
    closing = "; ".join(f"{s}: " + ", ".join(f"{column.removeprefix('closes of the gap: ')} "
                                             f"{summary.loc[s, column]:.0%}"
                                             for column in summary.columns if column.startswith("closes"))
                        for s in summary.index)
    other = f"drop, {OTHER_POSITIONS}"
    positions = ("" if other not in summary.columns else
                 " With the means taken over every token but the first instead of at the last prompt token (every "
                 "write site): " + ", ".join(f"{s} {summary.loc[s, other]:.1f}" for s in summary.index) + ".")
    return (f"Mean ablation at every write site lowers {target}'s mean refusal score by {drops['every write site']}; "
            f"at the block inputs only by {drops['block inputs']}. Share of that gap closed by also resetting "
            f"each kind of write: {closing}.{positions}")


def condition_scores(lm: LoadedModel, conditions: dict, harmful: Sequence[str], harmless: Sequence[str] | None,
                     batch_size: int = 16, n_boot: int = 2000, seed: int = 0):
    """Generation-free effect of each named condition (a context-manager factory ``lm -> context``, or None for the
    model as it is) on ``lm``: the mean refusal score on ``harmful`` with a 95% bootstrap interval over prompts, and
    (unless ``harmless`` is None) the mean first-token KL on ``harmless`` from the unablated model. A DataFrame
    indexed by condition; its ``per_prompt`` column holds each prompt's score, for paired comparisons.

    Under ``REFUSAL_BOOK_PACKED_LINEAR=all`` the weights are packed for oneDNN once, and the layers a condition edits
    once more inside it (``lib.packed.packed_products``; a condition that edits weights must replace the tensors, as
    ``lib.ablation.orthogonalized`` does, or edit them under ``torch.no_grad()``, not through ``.data``)."""
    index = bootstrap_indices(len(harmful), n_boot, seed)
    rows = []
    with packed_products(lm.model, "measurement"):
        clean_harmless = None if harmless is None else next_token_log_probs(lm, harmless, batch_size)
        for name, condition in progress(list(conditions.items()), desc=f"conditions {lm.info.variant}"):
            applied = condition(lm) if condition is not None else contextlib.nullcontext()
            with applied, packed_products(lm.model, "measurement"):
                scores = refusal_score_from(lm, next_token_log_probs(lm, harmful, batch_size)).double()
                damage = {} if harmless is None else {"harmless KL": float(kl_divergence(
                    clean_harmless, next_token_log_probs(lm, harmless, batch_size)).mean())}
            low, high = bootstrap_mean_interval(scores, index)
            rows.append({"condition": name, "refusal score": float(scores.mean()), "low": low, "high": high,
                         **damage, "n": len(harmful), "per_prompt": tuple(scores.tolist())})
    return pd.DataFrame(rows).set_index("condition")


def mean_push(direction: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean projection ``m`` on a direction at every site (``[n_layers, 3]``): what zero ablation removes at
    every position there, and what mean ablation keeps."""
    return (stats["mean"].double() @ _unit(direction)).float()


def _unit(direction: torch.Tensor) -> torch.Tensor:
    """``direction`` as a flat float64 unit vector (``lib.directions.unit``)."""
    return unit(torch.as_tensor(direction).detach().double().reshape(-1))


def offset_summary(scores, target: str, sources: Sequence[str]):
    """From ``condition_scores`` run with the conditions this chapter names (``"<s>: zero"``, ``"<s>: mean"``,
    ``"<s>: zero, first token spared"``, ``"<s>: matched control"``, ``"<target> with <s>'s coordinate"``): per
    source, the drop in mean refusal score from the unablated target under each condition, the control's drop as
    a share of the source's zero-ablation drop, and (for sources other than the target) the share of the gap
    between the two directions' zero-ablation drops that swapping the one massive coordinate moves."""
    score = scores["refusal score"]
    none, own = score["none"], score[f"{target}: zero"]
    rows = []
    for s in sources:
        zero_drop = none - score[f"{s}: zero"]
        row = {"source": s, "drop, zero": zero_drop, "drop, mean": none - score[f"{s}: mean"],
               "drop, first token spared": none - score[f"{s}: zero, first token spared"],
               "drop, matched control": none - score[f"{s}: matched control"],
               "control / source (zero)": (none - score[f"{s}: matched control"]) / zero_drop}
        gap = score[f"{s}: zero"] - own
        swapped = f"{target} with {s}'s coordinate"
        row["swap moves (share of gap)"] = (score[swapped] - own) / gap if s != target and swapped in score else None
        rows.append(row)
    return pd.DataFrame(rows).set_index("source")


def describe(summary, target: str, coordinate: int) -> str:
    """The summary in sentences, one per source other than ``target`` (numbers as computed, one decimal)."""
    own = summary.loc[target]
    lines = [f"{target}'s own direction lowers its mean refusal score by {own['drop, zero']:.1f} under zero ablation "
             f"and by {own['drop, mean']:.1f} under mean ablation at every write site."]
    for source, row in summary.drop(index=target).iterrows():
        lines.append(
            f"{source}'s direction: {row['drop, zero']:.1f} under zero ablation, {row['drop, mean']:.1f} under mean "
            f"ablation at every write site, {row['drop, first token spared']:.1f} with the first token spared; giving "
            f"{target}'s direction "
            f"this direction's value on coordinate {coordinate} alone moves {row['swap moves (share of gap)']:.1%} of "
            f"the zero-ablation gap between the two; a random direction with the same mean projection changes the "
            f"score by {-row['drop, matched control']:+.1f}, against {-row['drop, zero']:+.1f} for the source.")
    return "\n".join(lines)
