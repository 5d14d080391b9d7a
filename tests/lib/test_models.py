"""lib.models: the family registry, loading, adapters, templates and the errors for bad input."""

import json

import pytest
import torch

from lib import inputs, models
from lib.models import UnknownModelError
from lib.sources import CorruptModelError, ModelUnavailableError


def test_unknown_family_lists_known_ones():
    with pytest.raises(UnknownModelError, match="Unknown model family 'gpt-9'.*smollm2-135m"):
        models.load("gpt-9")


def test_unknown_variant_lists_variants():
    with pytest.raises(UnknownModelError, match="no variant 'sft'.*ssft, at, lat"):
        models.load("llama2-7b", "sft")


def test_untrained_variant_says_not_trained(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "REPO_ROOT", tmp_path)
    with pytest.raises(ModelUnavailableError, match="not trained yet"):
        models.load("smollm2-135m", "lat")


def test_hub_model_missing_offline_names_id_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="meta-llama/Llama-2-7b-chat-hf.*hf download"):
        models.load("llama2-7b", "ssft", device="cpu")


def test_nf4_needs_cuda(tiny_family):
    with pytest.raises(ValueError, match="nf4.*CUDA"):
        models.load("tiny-llama", "base", device="cpu", quantization="nf4")


def test_family_yaml_entry_needs_base_and_variants():
    with pytest.raises(ValueError, match="lacks"):
        models.register_families({"broken": {"template": "chat"}})


def test_register_from_yaml_file(tmp_path, tiny_family):
    path = tmp_path / "extra.yaml"
    path.write_text(f"tiny-yaml:\n  base: {{local: {tiny_family / 'base'}}}\n  variants: {{base: {{}}}}\n")
    assert models.register_families(path) == ["tiny-yaml"]
    model, tokenizer, info = models.load("tiny-yaml", device="cpu")
    assert info.n_layers == 4 and info.template.template == "chat"


def test_load_describes_model(tiny):
    model, tokenizer, info = tiny
    assert (info.n_layers, info.d_model) == (4, 64)
    assert info.layers is model.model.layers
    assert info.modules == {"attn": "self_attn", "mlp": "mlp", "mid": "post_attention_layernorm"}
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert info.dtype == torch.float32 and info.device.type == "cpu"
    assert not any(p.requires_grad for p in model.parameters())




def test_adapter_variant_merges_and_changes_logits(tiny):
    lora = models.load("tiny-llama", "lora", device="cpu")
    batch = inputs.encode(tiny, ["write a poem"])
    with torch.no_grad():
        base_logits, lora_logits = tiny.model(**batch).logits, lora.model(**batch).logits
    assert not torch.allclose(base_logits, lora_logits)
    assert lora.info.fingerprint != tiny.info.fingerprint
    assert not any("lora" in name for name, _ in lora.model.named_parameters())  # merged, not wrapped


def test_corrupted_adapter_fails_checksum(tiny_family, tmp_path):
    import shutil

    broken = tmp_path / "adapter"
    shutil.copytree(tiny_family / "adapter", broken)
    weights = broken / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    models.register_families({"tiny-broken": {"base": {"local": str(tiny_family / "base")},
                                              "variants": {"lora": {"adapters": [{"path": str(broken)}]}}}})
    with pytest.raises(CorruptModelError, match="adapter_model.safetensors.*SHA-256"):
        models.load("tiny-broken", "lora", device="cpu")




def test_decoder_layers_found_by_size_for_unknown_layout():
    from torch import nn

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 3})()
            self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    odd = Odd()
    assert models.find_decoder_layers(odd) is odd.blocks



def _adapter_copy(tiny_family, tmp_path, name):
    import shutil

    folder = tmp_path / name
    shutil.copytree(tiny_family / "adapter", folder)
    models.register_families({f"tiny-{name}": {"base": {"local": str(tiny_family / "base")},
                                               "variants": {"lora": {"adapters": [{"path": str(folder)}]}}}})
    return folder


def test_adapter_manifest_listing_no_weights_is_refused(tiny_family, tmp_path):
    folder = _adapter_copy(tiny_family, tmp_path, "empty-manifest")
    (folder / "manifest.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(CorruptModelError, match="lists no weight file"):
        models.load("tiny-empty-manifest", "lora", device="cpu")


def test_weights_missing_from_the_manifest_are_refused(tiny_family, tmp_path):
    folder = _adapter_copy(tiny_family, tmp_path, "extra-weights")
    (folder / "adapter_model.bin").write_bytes(b"unvouched")
    with pytest.raises(CorruptModelError, match=r"adapter_model.bin.*not in"):
        models.load("tiny-extra-weights", "lora", device="cpu")


def test_corrupt_manifest_json_names_the_file(tiny_family, tmp_path):
    folder = _adapter_copy(tiny_family, tmp_path, "bad-json")
    (folder / "manifest.json").write_text('{"files": ')
    with pytest.raises(CorruptModelError, match=r"manifest.json is not valid JSON.*git checkout"):
        models.load("tiny-bad-json", "lora", device="cpu")


def test_local_base_fingerprint_covers_every_file(tiny_family, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_family / "base", base)
    models.register_families({"tiny-local": {"base": {"local": str(base)}, "variants": {"base": {}}}})
    before = models.load("tiny-local", device="cpu").info.fingerprint
    (base / "pytorch_model.bin").write_bytes(b"weights in another format")
    assert models.load("tiny-local", device="cpu").info.fingerprint != before




def test_family_entry_quantization_is_read(tiny_family):
    spec = dict(models.family_spec("tiny-llama"), quantization="nf4")
    models.register_families({"tiny-nf4": spec})
    with pytest.raises(ValueError, match="nf4.*CUDA"):  # the family's key reached the loader
        models.load("tiny-nf4", "base", device="cpu")


def test_resolve_variants(tiny_family):
    assert models.resolve_variants("tiny-llama", "available") == models.available_variants("tiny-llama")
    assert models.resolve_variants("tiny-llama", ("lora",)) == ["lora"]
    with pytest.raises(ValueError, match="variants = 'all': give 'available' or a list"):
        models.resolve_variants("tiny-llama", "all")


def test_fingerprint_without_loading_equals_the_loaded_one(tiny, tiny_family):
    assert models.fingerprint("tiny-llama", "base", device="cpu") == tiny.info.fingerprint
    lora = models.load("tiny-llama", "lora", device="cpu")
    assert models.fingerprint("tiny-llama", "lora", device="cpu") == lora.info.fingerprint
    assert models.fingerprint("tiny-llama", "lora", device="cpu", dtype="bfloat16") != lora.info.fingerprint


def test_stale_directions_are_caught_before_any_model_loads(tiny, tiny_family):
    from lib import directions
    from lib.artifacts import ArtifactError

    meta = {"fingerprints": {"base": tiny.info.fingerprint, "lora": "0" * 16}}
    directions.check_current(meta, "tiny-llama", ["base"], device="cpu")
    with pytest.raises(ArtifactError, match=r"tiny-llama/lora were computed from other weights.*04_directions"):
        directions.check_current(meta, "tiny-llama", ["base", "lora"], device="cpu")


def test_for_each_model_holds_one_model_at_a_time(monkeypatch):
    import gc
    import weakref

    class Model:
        def __init__(self, variant):
            self.variant = variant

    alive = []

    def fake_load(family, variant, device="auto", dtype="auto"):
        gc.collect()
        assert not [ref for ref in alive if ref() is not None], "the previous model is still in memory"
        model = Model(variant)
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(models, "load", fake_load)
    results = models.for_each_model("fam", ["b", "a", "c"], lambda lm: lm.variant * 2)
    assert list(results.items()) == [("b", "bb"), ("a", "aa"), ("c", "cc")]
    with pytest.raises(AssertionError, match="still in memory"):
        models.for_each_model("fam", ["x", "y"], lambda lm: lm)  # work that keeps the model is caught
