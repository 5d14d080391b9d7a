"""A stand-in for the paper's models and data: a random Llama-2-shaped model and two random LoRA adapters written
into a Hugging Face cache under the exact hub ids of ``lib/families.yaml``, AdvBench/Alpaca-shaped files listed, with
their checksums, for ``$REFUSAL_BOOK_PAPER_DATA``, and ``params/llama2-7b.yaml`` adapted to run on them.

Two sizes: ``TINY`` (16 layers of width 64; the CI dress rehearsal, ``tests/test_rehearsal.py``) and
``benchmarks.gpu_bench.LLAMA2_7B`` (the GPU timing of the whole profile, ``benchmarks/profile_timing.py``). The numbers
either gives are meaningless; what they prove is that every chapter of the profile runs, and how long it takes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
import yaml

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


def standin_tokenizer(vocab_size: int | None = None):
    """The word-level tokenizer over ``STANDIN_WORDS``, padded with words ``w<i>`` up to ``vocab_size`` if given."""
    words = sorted(set(STANDIN_WORDS))
    filler = [f"w{i}" for i in range(len(words) + 5, vocab_size or 0)]  # 5: the tokenizer's special tokens
    return word_tokenizer(words + filler)


def random_llama(shapes: dict, device="cpu", dtype=torch.float32, init_std: float | None = None, seed: int = 0):
    """A LlamaForCausalLM with Llama-2's special ids and untied embeddings, made directly on ``device`` in ``dtype``
    (no detour through CPU memory); ``init_std`` redraws every matrix with that spread (the tiny stand-in's weights
    are larger than the default init, so that hooks visibly change outputs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

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


def write_hub_models(hub_cache: Path, family: str = "llama2-7b", shapes: dict | None = None, device="cpu",
                     dtype=torch.float32, init_std: float | None = 0.2, lora_std: float = 0.3,
                     lora_modules: tuple[str, ...] = ("q_proj", "v_proj"), lora_rank: int = 4) -> None:
    """The family's base model (``shapes``, default ``TINY``) and a random LoRA adapter for each of its variants' hub
    adapters, as a Hugging Face cache at ``hub_cache``."""
    from peft import LoraConfig, get_peft_model

    spec = family_spec(family)
    shapes = dict(shapes or TINY)
    tokenizer = standin_tokenizer(shapes.get("vocab_size"))
    shapes["vocab_size"] = shapes.get("vocab_size", len(tokenizer))
    model = random_llama(shapes, device, dtype, init_std)
    base = _snapshot(hub_cache, spec["base"]["hub"])
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapters = [a["hub"] for v in spec["variants"].values() for a in v.get("adapters", []) if "hub" in a]
    for seed, repo_id in enumerate(adapters, start=1):
        peft_model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank,
                                                      target_modules=list(lora_modules), init_lora_weights=False))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.normal_(0, lora_std)
        peft_model.save_pretrained(_snapshot(hub_cache, repo_id))
        model = peft_model.unload()  # the base model again, for the next adapter


def write_paper_data(folder: Path, n_alpaca: int = 600, filler_words: int = 0) -> Path:
    """AdvBench- and Alpaca-shaped files (AdvBench's 520 rows; made-up requests from the stand-in's words, each
    lengthened by ``filler_words`` more) and the listing ``$REFUSAL_BOOK_PAPER_DATA`` names; returns the listing."""
    folder.mkdir(parents=True, exist_ok=True)
    verbs = ["write", "give", "explain", "tell", "build", "list"]
    things = ["a bomb", "a story", "a poem", "a plan", "an email", "a recipe", "a song", "a letter", "steps"]
    topics = ["the sun", "a dog", "a car", "a hack", "bread", "cake", "the sky"]
    words = sorted(set(STANDIN_WORDS))

    def request(i: int) -> str:
        filler = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(filler_words))
        return f"{verbs[i % 6]} me {things[(i // 6) % 9]} about {topics[(i // 54) % 7]} {i} {filler}".rstrip()

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


def paper_profile(folder: Path, device: str = "cpu", smaller: bool = True, changes=None) -> Path:
    """``params/llama2-7b.yaml`` on ``device`` (with ``SMALLER`` samples if ``smaller``), after ``changes(profile)``,
    written to ``folder/llama2-7b.yaml`` (the profile's name, so its outputs go where the real profile's would)."""
    profile = yaml.safe_load((REPO_ROOT / "params" / "llama2-7b.yaml").read_text())
    profile["defaults"]["device"] = device
    if smaller:
        for key, overrides in profile["chapters"].items():
            overrides.update({name: value for name, value in SMALLER.items() if name in overrides},
                             **SMALLER_EXTRA.get(key, {}))
    if changes:
        changes(profile)
    path = folder / "llama2-7b.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path
