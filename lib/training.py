"""Model organisms: LoRA fine-tuning on CPU or GPU, with the paper's untargeted (latent) adversary.

SSFT: LoRA from the base model on harmful -> refusal and harmless -> the base model's own answer.
AT / LAT (Casper et al. 2024, as used by the paper): a new LoRA on the merged SSFT model. For every batch an
adversary perturbs the residual stream at one site over the whole [sequence x d_model] tensor of each example,
inside an L2 ball of radius epsilon: random start (Gaussian rescaled to radius U(0, 1) * epsilon), then PGD steps of
size epsilon / steps along the per-example L2-normalised gradient that INCREASES the LM loss on the training targets,
projected back into the ball after each step. The model then takes one optimiser step that lowers the LM loss under
that perturbation (no separate clean loss). AT perturbs the token embeddings (resid_pre of layer 0), LAT the
residual stream entering ``adversary_layer``. The control variant trains the same LoRA with no adversary.

The adversary itself is ``lib.adversary``, the losses ``lib.losses``, what is trained on (refusals, distilled
answers, examples, tokenisation) ``lib.training_data``, the chapter's summaries ``lib.organisms``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, get_peft_model

from lib import data, models
from lib.adversary import loss_under_attack, per_example_norm, perturbation_hook, pgd_attack, residual_norms
from lib.artifacts import REPO_ROOT, artifact_path, read_json, sha256_file, sha256_text, write_json
from lib.hooks import attached
from lib.losses import lm_loss, odds_ratio_loss, response_logprob_sums, response_logprobs
from lib.models import LoadedModel
from lib.packed import packed_products, packed_setting
from lib.progress import progress
from lib.runtime import set_seed
from lib.training_data import ORGANISMS_ROOT, Example, distilled_answers, load_refusals, sft_examples, tokenize
from lib.training_state import Checkpoints, RunState, latest_checkpoint, restore_checkpoint, save_checkpoint


KINDS = ("sft", "control", "at", "lat")


@dataclass
class TrainConfig:
    """Hyperparameters of one training run (recorded verbatim in the training log)."""

    kind: str
    steps: int
    learning_rate: float
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    weight_decay: float = 6e-4
    max_grad_norm: float = 0.25
    warmup_fraction: float = 0.03
    max_length: int = 160
    max_response_tokens: int | None = None  # train on the first N response tokens only (None: all)
    seed: int = 42
    epsilon: float | None = None
    pgd_steps: int = 6
    adversary_layer: int | None = None
    preference_weight: float = 0.0  # weight of the ORPO odds-ratio term on examples with a rejected response
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Unknown training kind {self.kind!r}; choose one of {KINDS}.")
        if self.kind in ("at", "lat") and (self.epsilon is None or self.epsilon <= 0):
            raise ValueError(f"{self.kind!r} training needs a positive epsilon.")
        if self.kind == "lat" and self.adversary_layer is None:
            raise ValueError("'lat' training needs adversary_layer (the decoder layer whose input is perturbed).")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1.")
        if self.preference_weight < 0:
            raise ValueError(f"preference_weight must be >= 0 (0 disables the preference term), "
                             f"got {self.preference_weight}.")

    @property
    def adversary_site_layer(self) -> int | None:
        """The decoder layer whose input (resid_pre) the adversary perturbs: 0 (= token embeddings) for AT."""
        return {"at": 0, "lat": self.adversary_layer}.get(self.kind)


def choose_epsilon(lm: LoadedModel, probe_examples: Sequence[Example], layer: int, fractions: Sequence[float],
                   min_loss_increase: float = 1.0, max_length: int = 160, max_response_tokens: int | None = None,
                   seed: int = 42) -> dict:
    """The pre-stated rule for this model's radius: express candidate radii as fractions of the median per-example
    residual norm at the perturbed site, and take the smallest whose PGD attack raises the mean LM loss on a fixed
    probe batch of training examples (``probe_examples``, one batch) by at least ``min_loss_increase`` nats per
    token. Returns the whole sweep."""
    probe = tokenize(lm, list(probe_examples), max_length, max_response_tokens)
    probe = {k: v.to(lm.info.device) for k, v in probe.items()}
    scale = float(residual_norms(lm, probe, layer).median())
    sweep, chosen = [], None
    for fraction in sorted(fractions):
        clean, attacked = loss_under_attack(lm, probe, layer, fraction * scale, seed=seed)
        sweep.append({"fraction": fraction, "epsilon": fraction * scale, "clean_loss": clean,
                      "attacked_loss": attacked, "increase": attacked - clean})
        if chosen is None and attacked - clean >= min_loss_increase:
            chosen = fraction * scale
    return {"layer": layer, "median_norm": scale, "rule": f"smallest radius raising the loss by >= "
            f"{min_loss_increase} nat/token", "sweep": sweep, "epsilon": chosen if chosen is not None
            else sweep[-1]["epsilon"], "criterion_met": chosen is not None}


def _with_rejected(examples: Sequence[Example]) -> tuple[list[Example], list[int]]:
    """``examples`` followed by one (prompt, rejected) row per example that has a rejected response; and the
    indices of those examples."""
    paired = [i for i, e in enumerate(examples) if e.rejected is not None]
    return list(examples) + [Example(examples[i].prompt, examples[i].rejected) for i in paired], paired


def preference_loss(lm: LoadedModel, examples: Sequence[Example], config: TrainConfig) -> torch.Tensor:
    """The odds-ratio term on the clean model for the examples that carry a rejected response, in one forward pass
    over their chosen and rejected responses."""
    rows, paired = _with_rejected([e for e in examples if e.rejected is not None])
    batch = {k: v.to(lm.info.device) for k, v in tokenize(lm, rows, config.max_length,
                                                           config.max_response_tokens).items()}
    logp = response_logprobs(lm, batch)
    return odds_ratio_loss(logp[paired], logp[len(paired):])


def lm_and_preference_loss(lm: LoadedModel, examples: Sequence[Example],
                           config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM loss on ``examples``, odds-ratio term) from one forward pass over the examples and their rejected
    responses: the no-adversary training step, which needs no separate clean pass."""
    rows, paired = _with_rejected(examples)
    batch = {k: v.to(lm.info.device) for k, v in tokenize(lm, rows, config.max_length,
                                                           config.max_response_tokens).items()}
    sums, counts = response_logprob_sums(lm, batch)
    n = len(examples)
    logp = sums / counts.clamp_min(1)
    return -sums[:n].sum() / counts[:n].sum().clamp_min(1), odds_ratio_loss(logp[paired], logp[n:])


def _lr_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


@dataclass
class LoraRun:
    """A LoRA being trained: the PEFT-wrapped model, its AdamW optimiser, the warm-up schedule and the trainable
    parameters (the LoRA weights)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trainable: list[torch.nn.Parameter]


def prepare_run(lm: LoadedModel, config: TrainConfig) -> LoraRun:
    """Seed everything and wrap ``lm`` in a new LoRA (PEFT) with its optimiser and warm-up schedule."""
    set_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(lm.model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = max(1, round(config.warmup_fraction * config.steps))
    return LoraRun(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup)), trainable)


def run_identity(lm: LoadedModel, examples: Sequence[Example], config: TrainConfig) -> str:
    """What a checkpoint must share with a run to be resumed by it: the settings, the examples in order, the model
    the LoRA is trained on, and where the products are packed (``lib.packed``; packing moves the last bits)."""
    return sha256_text(json.dumps({"config": asdict(config), "examples": [asdict(e) for e in examples],
                                   "model": lm.info.fingerprint, "packed": packed_setting()}, sort_keys=True,
                                  default=str))


def train_lora(lm: LoadedModel, examples: Sequence[Example], config: TrainConfig, desc: str | None = None,
               checkpoints: Checkpoints | None = None, stop_at: int | None = None):
    """Train a new LoRA on ``lm`` (in place, wrapped by PEFT) and return (peft_model, log).

    With ``checkpoints``, the whole state of the run is written every ``checkpoints.every`` steps, at ``stop_at``
    and at the end (``lib.training_state``), and a run started with the same settings, examples and model resumes
    from the latest one: the adapter comes out the same, bit for bit, as from a run that went straight through.
    ``stop_at`` ends this call after that many steps of the run (``log["complete"]`` is then False); the next call
    goes on from there. The frozen weights are multiplied packed for oneDNN where ``lib.packed`` packs training."""
    if not examples:
        raise ValueError("No training examples.")
    if stop_at is not None and not 0 < stop_at <= config.steps:
        raise ValueError(f"stop_at must be a step of the run (1 to {config.steps}), got {stop_at}.")
    run = prepare_run(lm, config)
    order_rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    state = RunState(log={"config": asdict(config), "steps": [], "wall_seconds": 0.0, "sessions": []})
    identity = run_identity(lm, examples, config)
    last = config.steps if stop_at is None else stop_at
    if checkpoints is not None:
        found = latest_checkpoint(checkpoints, identity, last)
        if found is not None:
            state = restore_checkpoint(found, run.model, run.optimizer, run.scheduler, order_rng, generator)
    first, start = state.step, time.perf_counter()

    with packed_products(lm.model, "training", gradients=True):
        for step in progress(range(first, last), desc=desc or f"train {config.kind}", total=last - first):
            if len(state.pool) < config.batch_size:
                refill = list(range(len(examples)))
                order_rng.shuffle(refill)
                state.pool += refill
            indices, state.pool = state.pool[:config.batch_size], state.pool[config.batch_size:]
            state.log["steps"].append(training_step(lm, run, [examples[i] for i in indices], config, generator, step))
            if checkpoints is not None and ((step + 1) % checkpoints.every == 0 or step + 1 == last):
                save_checkpoint(checkpoints, identity, RunState(step + 1, state.pool, _with_session(
                    state.log, first, step + 1, start, lm)), run.model, run.optimizer, run.scheduler, order_rng,
                    generator)
    run.model.eval()
    log = _with_session(state.log, first, last, start, lm)
    log["complete"] = last == config.steps
    log["machine"] = log["sessions"][-1]["machine"]
    return run.model, log


def training_step(lm: LoadedModel, run: LoraRun, chosen: Sequence[Example], config: TrainConfig,
                  generator: torch.Generator, step: int) -> dict:
    """One optimiser step on the batch ``chosen``: under a fresh PGD perturbation at the adversary's site for AT
    and LAT, plain for the control and SSFT, with the odds-ratio term where the recipe weights it. Returns the
    step's log record (loss, gradient norm, the perturbation's mean norm)."""
    batch = {k: v.to(lm.info.device) for k, v in tokenize(lm, chosen, config.max_length,
                                                       config.max_response_tokens).items()}
    record = {"step": step}
    preference = None
    with_preference = config.preference_weight > 0 and any(e.rejected is not None for e in chosen)
    layer = config.adversary_site_layer
    if layer is not None:
        run.model.eval()  # the adversary sees the model without dropout
        delta = pgd_attack(lm, batch, layer, config.epsilon, config.pgd_steps, generator)
        run.model.train()
        with attached([perturbation_hook(lm, layer, {"delta": delta})]):
            loss = lm_loss(lm, batch)
        record["delta_norm"] = round(float(per_example_norm(delta).mean()), 4)
        if with_preference:
            preference = preference_loss(lm, chosen, config)
    elif with_preference:
        loss, preference = lm_and_preference_loss(lm, chosen, config)
    else:
        loss = lm_loss(lm, batch)
    record["loss"] = round(float(loss.detach()), 5)
    if preference is not None:
        record["preference_loss"] = round(float(preference.detach()), 5)
        loss = loss + config.preference_weight * preference
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    record["grad_norm"] = round(float(grad_norm), 5)
    return record


def _with_session(log: dict, first: int, last: int, start: float, lm: LoadedModel) -> dict:
    """``log`` with this call's stretch of the run so far (steps, wall time, machine) added to its sessions and
    the run's total wall time updated; ``log`` itself is left as it is."""
    session = {"steps": [first, last], "wall_seconds": round(time.perf_counter() - start, 1), "machine": {
        "platform": platform.platform(), "processor": platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": str(lm.info.device), "packed": packed_setting()}}
    sessions = [*log["sessions"], session]
    return {**log, "sessions": sessions, "wall_seconds": round(sum(s["wall_seconds"] for s in sessions), 1)}


def save_adapter(peft_model, folder: Path, log: dict) -> Path:
    """Write the adapter (safetensors + config), its training log and a checksum manifest, atomically."""
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for config in peft_model.peft_config.values():  # PEFT keeps a set, saved in hash order: sort for stable bytes
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)
    with warnings.catch_warnings():  # PEFT warns that the base's name (family/variant) is not a local folder
        warnings.simplefilter("ignore", UserWarning)
        peft_model.save_pretrained(staging, safe_serialization=True)
    (staging / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
    write_json(staging / "training_log.json", log)
    files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
    write_json(staging / "manifest.json", {"files": files})
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


# --- the recipe for a family, and the whole pipeline ---------------------------------------------------------------

ADAPTERS_ROOT = REPO_ROOT / "data" / "adapters"

RECIPES_FILE = Path(__file__).with_name("recipes.yaml")


def recipes() -> dict[str, dict[str, dict]]:
    """Every family's training recipe from ``lib/recipes.yaml``: stage -> settings (lists as tuples) and ``why``."""
    def frozen(value):
        return tuple(value) if isinstance(value, list) else value

    raw = yaml.safe_load(RECIPES_FILE.read_text(encoding="utf-8"))
    return {family: {stage: {k: frozen(v) for k, v in spec.items()} for stage, spec in stages.items()}
            for family, stages in raw.items()}


def recipe(family: str) -> dict[str, dict]:
    """``family``'s recipe (``recipes``); a family without one is an error naming those that have one."""
    known = recipes()
    if family not in known:
        raise ValueError(f"No training recipe for family {family!r} in {RECIPES_FILE.name}; recipes exist for "
                         f"{sorted(known)}.")
    return known[family]


def _config(kind: str, spec: dict, seed: int, **extra) -> TrainConfig:
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != "why"}
    fields.pop("kind", None)
    return TrainConfig(kind=kind, seed=seed, **fields, **extra)


def examples_sha256(examples: Sequence[Example]) -> str:
    """The checksum of a training set, in order, as every training log records it."""
    return sha256_text(json.dumps([asdict(e) for e in examples]))


def recipe_examples(family: str, retrain_distill: bool = False) -> list[Example]:
    """The training examples of ``family``'s recipe: the `train` split's harmful prompts with their refusals and
    its harmless twins with the base model's own (distilled, cached) answers. The split is the book's
    (``lib.data.BOOK_SEED``) whatever the training seed: a replicate varies its data order, LoRA initialisation and
    adversary, never which prompts are held out."""
    pairs = data.split("train", data.BOOK_SEED)
    stages = recipe(family)
    answers = distilled_answers(family, pairs, stages["distill"], retrain=retrain_distill)
    harmful_answers = distilled_answers(family, pairs, stages["distill"], retrain=retrain_distill, kind="harmful")
    return sft_examples(pairs, load_refusals(), answers, harmful_answers)


def dose_checkpoints(family: str, variant: str, seed: int) -> Checkpoints:
    """Where the dose-response run (the recipe's ``dose`` stage) of ``variant`` with ``seed`` keeps its resumable
    checkpoints: ``artifacts/checkpoints/<family>/<variant>-seed<seed>-steps<steps>/``, one every
    ``checkpoint_every`` steps, all kept (each one is measured)."""
    dose = recipe(family)["dose"]
    return Checkpoints(artifact_path("checkpoints", family, f"{variant}-seed{seed}-steps{dose['steps']}"),
                       every=dose["checkpoint_every"])


def train_variant(family: str, variant: str, seed: int = 42, retrain_distill: bool = False,
                  dose: bool = False, stop_at: int | None = None) -> Path:
    """Train one variant of ``family`` from its recipe and write it to data/adapters/<family>/<variant>/. With
    ``dose``, the control, AT or LAT trains for the recipe's ``dose`` stage instead (its steps, with a resumable
    checkpoint every ``checkpoint_every`` steps, ``dose_checkpoints``), resuming where an earlier call stopped, and
    the checkpoint folder is returned: which checkpoint ships is decided by the measurements of every one
    (``lib.claims.chosen_dose``); ``stop_at`` ends the run at that step (the seed replicates train to the chosen
    dose on the same schedule)."""
    if dose and variant == "ssft":
        raise ValueError("The dose-response run trains the control, AT and LAT from the shipped SSFT, not SSFT.")
    stages = recipe(family)
    examples = recipe_examples(family, retrain_distill)
    data_hash = examples_sha256(examples)
    if variant == "ssft":
        lm = models.load(family, "base", device="auto")
        config = _config("sft", stages["ssft"], seed)
    elif variant in ("at", "lat", "ssft-control"):
        lm = models.load(family, "ssft", device="auto")
        kind = {"at": "at", "lat": "lat", "ssft-control": "control"}[variant]
        extra = {}
        if kind != "control":
            layer = 0 if kind == "at" else lm.info.adversary_layer
            sweep = epsilon_sweep(family, lm, examples, layer, stages["epsilon"], data.BOOK_SEED)  # one radius for all seeds
            extra = {"epsilon": sweep["epsilon"], "adversary_layer": layer, "notes": {"epsilon_sweep": sweep}}
        settings = {**stages["adversarial"], "steps": stages["dose"]["steps"]} if dose else stages["adversarial"]
        config = _config(kind, settings, seed, **extra)
    else:
        raise ValueError(f"Unknown variant {variant!r} to train; choose ssft, ssft-control, at or lat.")
    if dose:
        checkpoints = dose_checkpoints(family, variant, seed)
        train_lora(lm, examples, config, desc=f"train {variant} (dose run, seed {seed})", checkpoints=checkpoints,
                   stop_at=stop_at)
        return Path(checkpoints.folder)
    model, log = train_lora(lm, examples, config, desc=f"train {variant}")
    log.update(family=family, variant=variant, data_sha256=data_hash, n_examples=len(examples),
               recipe_why={k: v.get("why") for k, v in stages.items()})
    model.peft_config["default"].base_model_name_or_path = f"{family}/{'base' if variant == 'ssft' else 'ssft'}"
    return save_adapter(model, ADAPTERS_ROOT / family / variant, log)


def _as_stored(spec: dict) -> dict:
    """An epsilon spec as its JSON stores it (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}


def _sweep_settings(spec: dict) -> dict:
    """An epsilon spec's settings without its ``why``: what decides a rerun."""
    return {k: v for k, v in _as_stored(spec).items() if k != "why"}


def epsilon_sweep(family: str, lm: LoadedModel, examples: Sequence[Example], layer: int, spec: dict,
                  seed: int) -> dict:
    """Run (or reuse) the pre-stated epsilon rule at ``layer`` on the SSFT model; cached in data/organisms/."""
    path = ORGANISMS_ROOT / family / f"epsilon-layer{layer}.json"
    if path.exists():
        cached = read_json(path, "Restore it with `git checkout`, or delete it to rerun the sweep.")
        if _sweep_settings(cached.get("spec", {})) == _sweep_settings(spec) and cached.get("model") == lm.info.fingerprint:
            return cached
    probe = list(examples)[: spec["probe_examples"]]
    result = choose_epsilon(lm, probe, layer, spec["fractions"], spec["min_loss_increase"],
                            max_length=spec["max_length"], max_response_tokens=spec["max_response_tokens"], seed=seed)
    result["spec"] = _as_stored(spec)
    result["model"] = lm.info.fingerprint  # the SSFT model it was measured on: a retrained SSFT reruns the sweep
    write_json(path, result)
    return result


TRAINING_ORDER = ("ssft", "ssft-control", "at", "lat")


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(description="Train the model organisms of a family (ssft first).")
    parser.add_argument("--family", default="smollm2-135m")
    parser.add_argument("--variants", nargs="*", default=list(TRAINING_ORDER))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dose", action="store_true", help="the recipe's dose-response run of the control, AT and "
                        "LAT (resumable checkpoints under artifacts/checkpoints/; run it again to go on)")
    parser.add_argument("--stop-at", type=int, default=None, help="with --dose: stop the run after this step (the "
                        "seed replicates train to the chosen dose)")
    args = parser.parse_args(argv)
    if args.stop_at is not None and not args.dose:
        parser.error("--stop-at applies to the dose run only (--dose)")
    variants = [v for v in TRAINING_ORDER if v in args.variants and not (args.dose and v == "ssft")]
    for variant in variants:
        start = time.perf_counter()
        folder = train_variant(args.family, variant, args.seed, dose=args.dose, stop_at=args.stop_at)
        print(f"{variant}: {folder.relative_to(REPO_ROOT)} in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
