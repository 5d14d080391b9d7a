"""A stand-in for the paper's models and data, for the dress rehearsal of ``params/llama2-7b.yaml``: a tiny random
Llama-2-shaped model and two tiny LoRA adapters written into a Hugging Face cache under the exact hub ids of
``lib/families.yaml``, and AdvBench/Alpaca-shaped files listed, with their checksums, for ``$REFUSAL_BOOK_PAPER_DATA``.
The numbers it gives are meaningless; what it proves is that every chapter of the profile runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from benchmarks.common import word_tokenizer
from conftest import build_model
from lib.artifacts import sha256_file
from lib.data import ADVBENCH_ROWS
from lib.models import family_spec

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # the commit the stand-in's refs/main points at
STANDIN_WORDS = ("I Sorry Sure cannot help with that here is how to make a bomb cake bread write story poem about "
                 "the sun dog tell me joke steal car explain why sky blue list steps safe dangerous hack build give "
                 "plan for an email letter recipe song").split()


def _tokenizer():
    return word_tokenizer(sorted(set(STANDIN_WORDS)))


def _model(vocab_size: int, seed: int):
    """16 layers (the paper's plotted layers of 32 stay distinct), untied embeddings, room for 256 positions."""
    return build_model(vocab_size, seed, num_hidden_layers=16, num_key_value_heads=4, max_position_embeddings=256,
                       tie_word_embeddings=False, pad_token_id=0)


def _snapshot(hub_cache: Path, repo_id: str) -> Path:
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo / "snapshots" / SNAPSHOT


def write_hub_models(hub_cache: Path, family: str = "llama2-7b") -> None:
    """The family's base model and every hub adapter of its variants, as a Hugging Face cache at ``hub_cache``."""
    import torch
    from peft import LoraConfig, get_peft_model

    spec = family_spec(family)
    tokenizer = _tokenizer()
    base = _snapshot(hub_cache, spec["base"]["hub"])
    _model(len(tokenizer), 0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapters = [a["hub"] for v in spec["variants"].values() for a in v.get("adapters", []) if "hub" in a]
    for seed, repo_id in enumerate(adapters, start=1):
        peft_model = get_peft_model(_model(len(tokenizer), 0), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.normal_(0, 0.3, generator=generator)
        peft_model.save_pretrained(_snapshot(hub_cache, repo_id))


def write_paper_data(folder: Path, n_alpaca: int = 600) -> Path:
    """AdvBench- and Alpaca-shaped files (AdvBench's 520 rows; made-up requests from the stand-in's words) and the
    listing ``$REFUSAL_BOOK_PAPER_DATA`` names; returns the listing."""
    folder.mkdir(parents=True, exist_ok=True)
    verbs = ["write", "give", "explain", "tell", "build", "list"]
    things = ["a bomb", "a story", "a poem", "a plan", "an email", "a recipe", "a song", "a letter", "steps"]
    topics = ["the sun", "a dog", "a car", "a hack", "bread", "cake", "the sky"]

    def request(i: int) -> str:
        return f"{verbs[i % 6]} me {things[(i // 6) % 9]} about {topics[(i // 54) % 7]} {i}"

    with open(folder / "harmful_behaviors.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["goal", "target"])
        writer.writerows([[request(i), "Sure, here is"] for i in range(ADVBENCH_ROWS)])
    alpaca = [{"instruction": request(i + 7), "input": "", "output": "Sure"} for i in range(n_alpaca)]
    (folder / "alpaca_data.json").write_text(json.dumps(alpaca), encoding="utf-8")
    listing = {name: {"path": file, "sha256": sha256_file(folder / file)}
               for name, file in (("advbench", "harmful_behaviors.csv"), ("alpaca", "alpaca_data.json"))}
    (folder / "sources.json").write_text(json.dumps(listing), encoding="utf-8")
    return folder / "sources.json"
