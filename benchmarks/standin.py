"""A stand-in for the paper's models and data: a tiny random Llama-2-shaped model and two random LoRA adapters
written into a Hugging Face cache under the exact hub ids of ``lib/families.yaml``, AdvBench/Alpaca-shaped files
listed, with their checksums, for ``$REFUSAL_BOOK_PAPER_DATA``, and ``params/llama2-7b.yaml`` with smaller samples.
The CI rehearsal (``tests/bookkit/test_rehearsal.py``) runs every chapter of the paper's profile on it; its numbers are
meaningless. ``random_llama`` also makes the test suite's tiny models and the GPU benchmark's 7B-shaped one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import word_tokenizer
from lib.artifacts import REPO_ROOT, sha256_file
from lib.data import ADVBENCH_ROWS
from lib.models import family_spec

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # the commit the stand-in's refs/main points at
STANDIN_WORDS = ("I Sorry Sure cannot help with that here is how to make a bomb cake bread write story poem about "
                 "the sun dog tell me joke steal car explain why sky blue list steps safe dangerous hack build give "
                 "plan for an email letter recipe song").split()
# 16 layers (the paper's plotted layers of 32 stay distinct), room for 256 positions; the vocabulary is the tokenizer's
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256)
# The rehearsal's smaller samples and token budgets: they only repeat the same code (chapter keys: extra overrides)
SMALLER = {"n_test": 24, "n_side": 8, "max_new_tokens": 6, "n_score": 8, "n_generate": 8, "n_boot": 100,
           "n_reference": 16, "n_val": 8}
SMALLER_EXTRA = {"book/03_spectra": {"n_boot_layers": 5}}  # its by-layer bootstrap: 416 x 416 Gram matrices each


def standin_tokenizer():
    """The word-level tokenizer over ``STANDIN_WORDS``."""
    return word_tokenizer(sorted(set(STANDIN_WORDS)))


def random_llama(shapes: dict, device="cpu", dtype=torch.float32, init_std: float | None = None, seed: int = 0):
    """A LlamaForCausalLM with Llama-2's special ids and untied embeddings, made directly on ``device`` in ``dtype``
    (no detour through CPU memory); ``init_std`` redraws every matrix with that spread (the tiny stand-in's weights
    are larger than the default init, so that hooks visibly change outputs)."""
    config = LlamaConfig(**{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
                            **shapes})
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    if init_std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim == 2:
                    parameter.normal_(0, init_std)
    return model.eval()


def _snapshot(hub_cache: Path, repo_id: str) -> Path:
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo / "snapshots" / SNAPSHOT


def write_hub_models(hub_cache: Path, family: str = "llama2-7b", lora_std: float = 0.3, lora_rank: int = 4) -> None:
    """The family's base model (``TINY``) and a random LoRA adapter (q_proj, v_proj) for each of its variants' hub
    adapters, as a Hugging Face cache at ``hub_cache``."""
    spec = family_spec(family)
    tokenizer = standin_tokenizer()
    model = random_llama(dict(TINY, vocab_size=len(tokenizer)), init_std=0.2)
    base = _snapshot(hub_cache, spec["base"]["hub"])
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapters = [a["hub"] for v in spec["variants"].values() for a in v.get("adapters", []) if "hub" in a]
    for seed, repo_id in enumerate(adapters, start=1):
        peft_model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                      target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.normal_(0, lora_std)
        peft_model.save_pretrained(_snapshot(hub_cache, repo_id))
        model = peft_model.unload()  # the base model again, for the next adapter


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


def paper_profile(folder: Path, changes=None) -> Path:
    """``params/llama2-7b.yaml`` on the CPU with ``SMALLER`` samples, after ``changes(profile)``, written to
    ``folder/llama2-7b.yaml`` (the profile's name, so its outputs go where the real profile's would)."""
    profile = yaml.safe_load((REPO_ROOT / "params" / "llama2-7b.yaml").read_text())
    profile["defaults"]["device"] = "cpu"
    for key, overrides in profile["chapters"].items():
        overrides.update({name: value for name, value in SMALLER.items() if name in overrides},
                         **SMALLER_EXTRA.get(key, {}))
    if changes:
        changes(profile)
    path = folder / "llama2-7b.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path
