"""The shipped model organisms, for the organisms chapter: summaries of what training wrote (each adapter's training
log and files, its loss curve, the epsilon sweeps behind the adversaries' radii) and the robustness check that
attacks the trained variants afresh."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pandas as pd

from lib.adversary import Attack, cached_attack
from lib.artifacts import atomic_path, read_json, sha256_file
from lib.models import LoadedModel, family_spec
from lib.training import ADAPTERS_ROOT
from lib.training_data import ORGANISMS_ROOT, load_refusals, refusal_for


def training_log(family: str, variant: str) -> dict:
    path = ADAPTERS_ROOT / family / variant / "training_log.json"
    if not path.exists():
        raise FileNotFoundError(f"No training log at {path}: variant {variant!r} of {family!r} is not trained yet "
                                "(`make organisms`).")
    return read_json(path, "Restore it with `git checkout` or retrain the variant (`make organisms`).")


def adapter_table(family: str, variants: Sequence[str]):
    """One row per trained variant: what was trained, how, on what, for how long, and the shipped file."""
    rows = []
    for variant in variants:
        log, config = training_log(family, variant), training_log(family, variant)["config"]
        weights = ADAPTERS_ROOT / family / variant / "adapter_model.safetensors"
        rows.append({"variant": variant, "kind": config["kind"], "steps": log.get("shipped_step", config["steps"]),
                     "batch": config["batch_size"], "lr": config["learning_rate"], "LoRA r": config["lora_r"],
                     "targets": ", ".join(t.replace("_proj", "") for t in config["target_modules"]),
                     "adversary layer": config["adversary_layer"] if config["kind"] == "lat"
                     else (0 if config["kind"] == "at" else None),
                     "epsilon": config["epsilon"], "preference weight": config.get("preference_weight", 0.0),
                     "examples": log["n_examples"],
                     "minutes": round(log["wall_seconds"] / 60, 1), "adapter KiB": round(weights.stat().st_size / 1024),
                     "sha256": sha256_file(weights)[:12]})
    return pd.DataFrame(rows).set_index("variant")


def adapters_readme(family: str, variants: Sequence[str]) -> str:
    """``data/adapters/<family>/README.md`` as the shipped adapters' logs and manifests say it should read: each
    adapter's recipe stage, starting model, steps (the dose), batch, seed, radius, the products it was trained with
    (``lib.packed``, as its log records it; a log that names no setting was trained with MKL) and the SHA-256 of its
    weights
    (``tests/lib/test_organisms.py`` checks that the file is this text)."""
    lines = [f"# Shipped adapters of `{family}`", "",
             "Written by `python -m lib.organisms --readme` from each adapter's `training_log.json` and `manifest.json`; "
             "`make organisms` retrains them from `lib/recipes.yaml` (`ssft` first, then the others from the merged "
             "`ssft`).", "",
             "| variant | kind | trained from | steps | batch | seed | epsilon | products | adapter sha256 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        log = training_log(family, variant)
        config = log["config"]
        weights = read_json(ADAPTERS_ROOT / family / variant / "manifest.json",
                            "Restore it with `git checkout`.")["files"]["adapter_model.safetensors"]
        packed = (log.get("machine") or (log.get("sessions") or [{}])[-1].get("machine", {})).get("packed", "0")
        epsilon = "" if config["epsilon"] is None else f"{config['epsilon']:.4g}"
        start = "base" if variant == "ssft" else "ssft"
        steps = log.get("shipped_step", config["steps"])  # a checkpoint of a longer run ships at its own step
        lines.append(f"| `{variant}` | {config['kind']} | {start} | {steps} | {config['batch_size']} | "
                     f"{config['seed']} | {epsilon} | {'oneDNN packed' if packed != '0' else 'MKL'} | `{weights}` |")
    return "\n".join(lines) + "\n"


def loss_frame(family: str, variants: Sequence[str]):

    return pd.DataFrame([{"variant": v, "step": s["step"], "loss": s["loss"]}
                         for v in variants for s in training_log(family, v)["steps"]])


def epsilon_frame(family: str):
    """The epsilon sweeps behind the AT and LAT radii (one row per candidate radius tried)."""
    rows = []
    for path in sorted((ORGANISMS_ROOT / family).glob("epsilon-layer*.json")):
        result = read_json(path, "Restore it with `git checkout` or rerun the epsilon sweep (`make organisms`).")
        for row in result["sweep"]:
            rows.append({"layer": result["layer"], "median residual norm": result["median_norm"], **row,
                         "chosen": row["epsilon"] == result["epsilon"]})
    return pd.DataFrame(rows)



# --- the robustness check: a fresh PGD attack at each adversary's own site -------------------------------------------

def attack_sites(family: str) -> dict[str, int]:
    """The robustness check's two sites, label -> layer: the token embeddings (AT's) and the LAT layer (LAT's)."""
    lat_layer = family_spec(family)["adversary_layer"]
    return {"embeddings (layer 0)": 0, f"layer {lat_layer} (LAT site)": lat_layer}


def sites_attacked(family: str, variant: str) -> dict[str, int]:
    """Where ``variant`` is attacked: AT at the embeddings, LAT at its layer, every other variant (SSFT, the control:
    the baselines) at both."""
    own = {"at": 0, "lat": family_spec(family)["adversary_layer"]}.get(variant)
    return {label: layer for label, layer in attack_sites(family).items() if own is None or layer == own}


def chosen_radius(family: str, layer: int) -> float:
    """The radius the epsilon rule chose for the adversary at ``layer`` (the one AT or LAT trained with)."""
    epsilons = epsilon_frame(family)
    return epsilons.loc[epsilons["chosen"] & (epsilons["layer"] == layer), "epsilon"].item()


def robustness_completions(lm: LoadedModel, pairs: Sequence, steps: int, max_new_tokens: int,
                           seed: int) -> dict[str, list[str]]:
    """Site label -> the completions of ``pairs``' harmful prompts under a fresh PGD attack at that site
    (``sites_attacked``) of the chosen radius, whose loss is the refusal this book trains for each prompt
    (``adversary.cached_attack``)."""
    refusals = load_refusals()
    prompts, targets = [p.harmful for p in pairs], [refusal_for(p.id, refusals) for p in pairs]
    family = lm.info.family
    return {label: cached_attack(lm, prompts, targets,
                                 Attack(layer, chosen_radius(family, layer), steps, max_new_tokens), seed)
            for label, layer in sites_attacked(family, lm.info.variant).items()}


def readme_path(family: str):
    return ADAPTERS_ROOT / family / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write data/adapters/<family>/README.md from the shipped adapters' "
                                     "training logs and manifests.")
    parser.add_argument("--family", default="smollm2-135m")
    parser.add_argument("--readme", action="store_true", help="write the README (the only action)")
    args = parser.parse_args(argv)
    if not args.readme:
        parser.error("nothing to do: pass --readme")
    variants = [v for v in family_spec(args.family)["variants"] if v != "base"]
    with atomic_path(readme_path(args.family)) as tmp:
        tmp.write_text(adapters_readme(args.family, variants), encoding="utf-8")
    print(f"wrote {readme_path(args.family)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
