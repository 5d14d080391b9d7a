"""The dose-response run: the control, AT and LAT trained from SSFT for the recipe's ``dose`` steps with a checkpoint
every ``checkpoint_every`` steps (``python -m lib.training --dose``), and what every checkpoint is measured on, on
`pairs` prompts only (never the test split): refusal under a fresh PGD attack at both adversary sites, refusal of
harmful and harmless prompts with the paper's judge, and at the paper's relative layer the SVD shares of the
harmful-minus-harmless matrix and the cosine of the refusal direction with SSFT's.

A checkpoint becomes a model variant of its own (``checkpoint_variant``: SSFT with the checkpoint's adapter
merged), so every measurement is the one the chapters make, cached by the same keys. The measurements are written
to ``data/organisms/<family>/dose/`` (small JSON, committed); ``lib.claims.chosen_dose`` reads them to pick the
dose the book ships.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from peft import LoraConfig
from safetensors.torch import save_file

from lib import claims, models
from lib.adversary import Attack, cached_attack
from lib.artifacts import load_tensors, read_json, read_metadata, save_tensors, sha256_file, write_json
from lib.capture import collect
from lib.data import BOOK_SEED, everyday_prompts, split
from lib.directions import paired_differences
from lib.evaluation import evaluate, evaluate_pairs
from lib.judges import REFUSAL, acceptance, judge_all, rate_table
from lib.linalg import unit
from lib.organisms import attack_sites, chosen_radius
from lib.spectra import PAPER_LAYER, energy_fractions
from lib.stats import wilson_interval
from lib.training import ADAPTERS_ROOT, dose_checkpoints, examples_sha256, recipe, recipe_examples
from lib.training_data import ORGANISMS_ROOT, load_refusals, refusal_for
from lib.training_state import Checkpoints

DOSE_VARIANTS = ("ssft-control", "at", "lat")
ATTACK_STEPS, ATTACK_TOKENS = 6, 24  # the robustness check's PGD steps and tokens generated under the attack


def checkpoint_adapter(checkpoints: Checkpoints, step: int, base: str) -> Path:
    """The adapter of the checkpoint after ``step`` steps as a PEFT adapter folder with a checksum manifest (written
    once per checkpoint file, beside the checkpoints: a checkpoint written again is exported again), to be merged on
    top of the model it trained on (``base``, "<family>/<variant>")."""
    source = checkpoints.path(step)
    folder = Path(checkpoints.folder) / "adapters" / source.stem
    if step not in checkpoints.written():
        raise FileNotFoundError(f"{checkpoints.folder} has no checkpoint at step {step} (it has "
                                f"{checkpoints.written()}). Train it first (a dose run: python -m lib.training --dose).")
    written = read_metadata(source)["sha256"]
    if (folder / "manifest.json").exists() and read_json(folder / "training_log.json", "Delete the folder to export "
                                                         "it again.").get("checkpoint_sha256") == written:
        return folder
    tensors, meta = load_tensors(source)
    config = meta["log"]["config"]
    lora = LoraConfig(r=config["lora_r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                      target_modules=sorted(config["target_modules"]), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    lora.save_pretrained(staging)
    save_file({name.removeprefix("adapter/"): value.contiguous() for name, value in tensors.items()
               if name.startswith("adapter/")}, str(staging / "adapter_model.safetensors"))
    write_json(staging / "training_log.json", {**meta["log"], "checkpoint_sha256": written})
    write_json(staging / "manifest.json", {"files": {p.name: sha256_file(p) for p in sorted(staging.iterdir())
                                                     if p.is_file()}})
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def ship_checkpoint(checkpoints: Checkpoints, step: int, base: str, folder: Path, log_extra: dict | None = None) -> Path:
    """Ship the checkpoint after ``step`` steps as an adapter folder like every shipped one (PEFT files, its training
    log up to that step with ``log_extra`` added, a checksum manifest), written atomically to ``folder`` (for the
    dose the book ships: ``data/adapters/<family>/<variant>/``). The checkpoints themselves stay out of git."""
    exported = checkpoint_adapter(checkpoints, step, base)
    log = read_json(exported / "training_log.json", "Delete the exported folder to export it again.")
    log = {**log, "machine": log["sessions"][-1]["machine"], "complete": True}
    staging = Path(folder).with_name(Path(folder).name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(exported, staging)
    write_json(staging / "training_log.json", {**log, **(log_extra or {}), "shipped_step": step})
    write_json(staging / "manifest.json", {"files": {p.name: sha256_file(p) for p in sorted(staging.iterdir())
                                                     if p.is_file() and p.name != "manifest.json"}})
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return Path(folder)


def checkpoint_variant(family: str, name: str, checkpoints: Checkpoints, step: int, base: str = "ssft") -> str:
    """Register ``base`` with the adapter of the checkpoint after ``step`` steps merged on top as the variant
    ``name`` of ``family`` (the dose run's are named "<variant>@<step>-seed<seed>") and return ``name``."""
    spec = models.family_spec(family)
    if name not in spec["variants"]:
        below = spec["variants"][base]["adapters"]
        adapter = {"path": str(checkpoint_adapter(checkpoints, step, f"{family}/{base}"))}
        models.register_families({family: {**spec, "variants": {**spec["variants"],
                                                                name: {"adapters": [*below, adapter]}}}})
    return name


def measure(family: str, name: str, n_prompts: int, max_new_tokens: int = 64, batch_size: int = 64,
            device: str = "auto") -> dict:
    """Every measurement of one model (a checkpoint variant, or SSFT) on `pairs` prompts: the paper's judge's labels
    of the first ``n_prompts`` harmful prompts under a fresh PGD attack at each site (``lib.organisms.attack_sites``,
    the organisms chapter's attack), of the first ``n_prompts`` harmful and harmless prompts unattacked and of the
    everyday instructions (``lib.data.everyday_prompts``), and, on
    every pair at the paper's relative layer, the shares of the first and second singular values of the paired
    differences and the unit refusal direction. The prompts and the attack's random start are the book's
    (``lib.data.BOOK_SEED``) for every model, so that checkpoints and seeds differ only by their weights."""
    lm = models.load(family, name, device=device)
    pairs = split("pairs", BOOK_SEED)
    shown = pairs[:n_prompts]
    refusals = load_refusals()
    prompts, targets = [p.harmful for p in shown], [refusal_for(p.id, refusals) for p in shown]
    attacked = {label: judge_all(cached_attack(lm, prompts, targets, Attack(
        layer, chosen_radius(family, layer), ATTACK_STEPS, ATTACK_TOKENS), BOOK_SEED)) for label, layer in
        attack_sites(family).items()}
    unattacked = {**evaluate_pairs(lm, shown, max_new_tokens, batch_size),
                  "everyday": evaluate(lm, everyday_prompts(), None, max_new_tokens, batch_size, desc=f"{name} everyday")}
    layer = models.scale_layer(PAPER_LAYER, lm.info.n_layers)
    harmful = collect(lm, [p.harmful for p in pairs], [layer])["resid_pre"][:, 0]
    harmless = collect(lm, [p.harmless for p in pairs], [layer])["resid_pre"][:, 0]
    fractions = energy_fractions(paired_differences(harmful, harmless))
    direction = unit(harmful.double().mean(0) - harmless.double().mean(0))
    return {"model": name, "fingerprint": lm.info.fingerprint, "n_prompts": len(shown), "layer": layer,
            "under attack": attacked, "labels": {kind: result["labels"] for kind, result in unattacked.items()},
            "top-1 share": float(fractions[0]), "top-2 share": float(fractions[:2].sum()),
            "second component share": float(fractions[1]), "direction": direction.float()}


def results_path(family: str, seed: int) -> Path:
    """Where the measurements of the dose run with ``seed`` are kept (committed): one JSON file of every model's
    labels and shares, keyed "<variant>@<step>", and beside it their refusal directions (safetensors)."""
    return ORGANISMS_ROOT / family / "dose" / f"measurements-seed{seed}.json"


def directions_path(family: str, seed: int) -> Path:
    return results_path(family, seed).with_name(f"directions-seed{seed}.safetensors")


def measure_run(family: str, variants: Sequence[str] = DOSE_VARIANTS, seed: int = 42, device: str = "auto") -> list:
    """Measure SSFT (as "ssft@0") and every checkpoint of the dose run not measured yet on its present weights,
    writing each result as soon as it exists, so that a stopped measurement goes on where it stopped. Returns the
    keys measured now."""
    n_prompts = recipe(family)["dose"]["attack_prompts"]
    path, vectors = results_path(family, seed), directions_path(family, seed)
    done = read_json(path, "Delete it (and its directions) to measure again.") if path.exists() else {}
    directions = load_tensors(vectors)[0] if vectors.exists() else {}
    todo = [("ssft@0", "ssft")] + [(f"{v}@{step}", (v, step)) for v in variants
                                   for step in dose_checkpoints(family, v, seed).written()]
    measured = []
    for key, model in todo:
        name = model if isinstance(model, str) else checkpoint_variant(
            family, f"{model[0]}@{model[1]}-seed{seed}", dose_checkpoints(family, model[0], seed), model[1])
        if key in done and done[key]["fingerprint"] == models.fingerprint(family, name):
            continue  # measured on these very weights; other weights (a retrained SSFT, a rerun) are measured again
        result = measure(family, name, n_prompts, device=device)
        directions[key] = result.pop("direction")
        save_tensors(vectors, directions, {"layer": result["layer"], "seed": seed})
        done[key] = result
        write_json(path, done)
        measured.append(key)
    return measured


def _own_site(family: str, variant: str) -> str:
    """The label of ``variant``'s own adversary site among ``lib.organisms.attack_sites``."""
    layer = {"at": 0, "lat": models.family_spec(family)["adversary_layer"]}[variant]
    return next(label for label, site in attack_sites(family).items() if site == layer)


def checkpoint_tables(family: str, measurements: dict, trained: Sequence[str] = ("at", "lat"),
                      control: str = "ssft-control", seed: int = BOOK_SEED) -> dict:
    """``{step: (robustness table, acceptance table)}`` for every step at which the control and every variant of
    ``trained`` were measured (``measure_run``'s results): each trained variant under the attack at its own site
    against SSFT and the control of the same step (``lib.claims.robustness``), and the acceptance criteria of the
    control and the trained variants on the unattacked prompts (``lib.judges.acceptance``) — what
    ``lib.claims.chosen_dose`` reads."""
    steps = sorted({int(key.split("@")[1]) for key in measurements if not key.startswith("ssft@")})
    tables = {}
    for step in steps:
        keys = {v: f"{v}@{step}" for v in (control, *trained)}
        if any(key not in measurements for key in keys.values()):
            continue
        sites = [_own_site(family, v) for v in trained]
        under_attack = {(v, site): measurements[keys[v]]["under attack"][site] for v, site in zip(trained, sites)}
        for reference, key in (("ssft", "ssft@0"), (control, keys[control])):
            under_attack.update({(reference, site): measurements[key]["under attack"][site] for site in sites})
        robust = claims.robustness(under_attack, sites, trained, ("ssft", control), seed)
        rates = rate_table({(v, kind): measurements[key]["labels"][kind] for v, key in keys.items()
                            for kind in ("harmful", "harmless")}, keys=("variant", "prompts"))
        everyday = ("everyday",) if all("everyday" in measurements[key]["labels"] for key in keys.values()) else ()
        rates = rates if not everyday else pd.concat([rates, rate_table(
            {(v, "everyday"): measurements[key]["labels"]["everyday"] for v, key in keys.items()},
            keys=("variant", "prompts"))], ignore_index=True)
        tables[step] = (robust, acceptance(rates, list(keys), also_on=everyday))
    return tables


def curves(family: str, measurements: dict, directions: dict) -> pd.DataFrame:
    """Every measure of every measured model as a long frame for the chapter's curves: one row per (variant, step,
    measure) with its value and, for rates, the 95% Wilson interval. Rates (%): refusal under the attack at the
    variant's own site and at the other site (SSFT and the control: at both sites), of the harmful and harmless
    `pairs` prompts and of the everyday instructions; shares: the top-2 and second-component shares; and the cosine
    of the variant's direction with SSFT's (``directions["ssft@0"]``)."""
    reference = directions["ssft@0"].double()
    rows = []
    for key, result in measurements.items():
        variant, step = key.split("@")
        own = _own_site(family, variant) if variant in ("at", "lat") else None

        def rate(measure: str, labels: Sequence[str]) -> None:
            hits = sum(label == REFUSAL for label in labels)
            low, high = wilson_interval(hits, len(labels))
            rows.append({"variant": variant, "step": int(step), "measure": measure, "value": 100 * hits / len(labels),
                         "low": 100 * low, "high": 100 * high})

        for site, labels in result["under attack"].items():
            where = site if own is None else ("own site" if site == own else "other site")
            rate(f"refusal under attack, {where} (%)", labels)
        for kind, labels in result["labels"].items():
            rate(f"refusal of {kind} prompts (%)", labels)
        for measure in ("top-2 share", "second component share"):
            rows.append({"variant": variant, "step": int(step), "measure": measure, "value": result[measure]})
        rows.append({"variant": variant, "step": int(step), "measure": "cosine with SSFT's direction",
                     "value": float(directions[key].double() @ reference)})
    return pd.DataFrame(rows).sort_values(["measure", "variant", "step"], kind="stable", ignore_index=True)


def ship_chosen(family: str, measurements: dict, checkpoints: dict[str, Checkpoints], into: Path,
                steps: Sequence[int], log_extra: dict | None = None) -> dict:
    """Apply the stated rule (``lib.claims.chosen_dose`` over ``checkpoint_tables``) to the checkpoints of
    ``steps`` (every step the run was to write: the rule's "first" and "last" mean nothing on part of a run, so a
    step not measured for every variant is an error) and ship the control, AT and LAT checkpoints of the chosen
    step (``checkpoints[variant]``) into ``into/<variant>/`` with the decision and ``log_extra`` in their logs;
    returns the decision (written beside the measurements by the command line)."""
    if set(checkpoints) != set(DOSE_VARIANTS):
        raise ValueError(f"The dose ships the control, AT and LAT together ({DOSE_VARIANTS}); got {sorted(checkpoints)}.")
    tables = checkpoint_tables(family, measurements)
    missing = [step for step in steps if step not in tables]
    if missing:
        raise ValueError(f"Steps {missing} of the run are not measured for SSFT, the control, AT and LAT: finish "
                         "training and measuring (python -m lib.training --dose, python -m lib.dose) first.")
    decision = claims.chosen_dose({step: tables[step] for step in steps})
    for variant, variant_checkpoints in checkpoints.items():
        ship_checkpoint(variant_checkpoints, decision["step"], f"{family}/ssft", Path(into) / variant,
                        {**(log_extra or {}), "variant": variant,
                         "chosen_by": {"rule": decision["rule"], "robust_at": decision["robust"]}})
    return decision


def replicate_folder(family: str, variant: str, seed: int) -> Path:
    """Where a seed replicate of a shipped adapter lives: ``data/adapters/<family>/seeds/<variant>-seed<seed>/``."""
    return ADAPTERS_ROOT / family / "seeds" / f"{variant}-seed{seed}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure every checkpoint of the dose-response run not measured yet "
                                     "(and SSFT once), on `pairs` prompts; results go to data/organisms/<family>/dose/.")
    parser.add_argument("--family", default="smollm2-135m")
    parser.add_argument("--variants", nargs="*", default=list(DOSE_VARIANTS))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ship", action="store_true", help="after measuring, pick the dose by the stated rule and "
                        "ship the control, AT and LAT checkpoints of that step into data/adapters/<family>/ (seed "
                        "42), or, for another seed, its checkpoints at seed 42's dose into data/adapters/<family>/"
                        "seeds/")
    args = parser.parse_args(argv)
    for key in measure_run(args.family, args.variants, args.seed):
        print(f"measured {key}", flush=True)
    chosen_path = results_path(args.family, BOOK_SEED).with_name(f"chosen-seed{BOOK_SEED}.json")
    if args.ship and args.seed == BOOK_SEED:
        measurements = read_json(results_path(args.family, args.seed), "Measure the run first.")
        stage = recipe(args.family)["dose"]
        examples = recipe_examples(args.family)
        decision = ship_chosen(args.family, measurements,
                               {v: dose_checkpoints(args.family, v, args.seed) for v in DOSE_VARIANTS},
                               ADAPTERS_ROOT / args.family,
                               range(stage["checkpoint_every"], stage["steps"] + 1, stage["checkpoint_every"]),
                               {"family": args.family, "data_sha256": examples_sha256(examples),
                                "n_examples": len(examples)})
        write_json(chosen_path, decision)
        print(f"shipped step {decision['step']} ({decision['rule']})", flush=True)
    elif args.ship:  # a replicate ships at the dose seed 42's run chose, beside the shipped set
        step = read_json(chosen_path, f"Ship seed {BOOK_SEED}'s dose first (python -m lib.dose --ship).")["step"]
        for variant in DOSE_VARIANTS:
            ship_checkpoint(dose_checkpoints(args.family, variant, args.seed), step, f"{args.family}/ssft",
                            replicate_folder(args.family, variant, args.seed), {"replicate_of": variant})
        print(f"shipped seed {args.seed} at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
