"""Shared fixtures: a tiny random Llama (4 layers, d_model 64, tied embeddings) with a word-level tokenizer and the
paper's Llama-2 template, registered as the family ``tiny-llama`` with a ``base`` and a LoRA ``lora`` variant."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("REFUSAL_BOOK_PROGRESS", "0")

WORDS = ("how do i make a cake bomb bake bread write story poem about the sun moon dog cat tell me joke steal car "
         "help with homework please explain why sky is blue sure here sorry cannot can i am not able to this "
         "that it you we they what when where who give list of steps for safe dangerous hack build").split()
PAPER_TEMPLATE = "\n[INST]{prompt}[/INST]\n"


def build_tokenizer():
    from benchmarks.common import word_tokenizer

    return word_tokenizer(sorted(set(WORDS)))


def build_model(vocab_size: int, seed: int = 0, **config):
    """A random Llama (the tiny defaults below, overridden by ``config``) with weights larger than the default init."""
    from benchmarks.standin import random_llama

    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return random_llama({**settings, **config}, init_std=0.2, seed=seed)


def write_manifest(folder):
    from lib.artifacts import sha256_file

    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps({"files": files}))


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """Registers ``tiny-llama`` (local base + a LoRA adapter variant) and returns its folder."""
    from peft import LoraConfig, get_peft_model

    from lib import models

    root = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    peft_model = get_peft_model(build_model(len(tokenizer)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    write_manifest(root / "adapter")
    models.register_families({"tiny-llama": {
        "base": {"local": str(root / "base")}, "template": PAPER_TEMPLATE, "add_special_tokens": True,
        "refusal_tokens": ["sorry", "i"], "adversary_layer": 1,
        "variants": {"base": {"adapters": []}, "lora": {"adapters": [{"path": str(root / "adapter")}]}}}})
    return root


@pytest.fixture(scope="session")
def tiny(tiny_family):
    from lib import models

    return models.load("tiny-llama", "base", device="cpu")


@pytest.fixture
def offline_renderer():
    """Charts as the chapters make them (``lib.viz``'s renderer, data inline), altair's defaults back afterwards."""
    import altair as alt

    from lib import viz

    previous = alt.renderers.active
    viz.enable_offline_renderer()
    yield
    alt.renderers.enable(previous)
    alt.data_transformers.enable("default")
    alt.data_transformers.consolidate_datasets = True


@pytest.fixture
def prompts():
    return ["how do i bake bread", "tell me a joke about the cat", "write a poem",
            "explain why the sky is blue please help with homework"]
