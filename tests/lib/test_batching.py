"""lib.batching.auto_batch_size: a batch size from the model's shapes and the free memory."""

import pytest
import torch

from lib import batching, capture, generation, inputs

TINY_KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 16 * 4  # (K and V) x 4 layers x 2 KV heads x head_dim 16 x float32


def test_kv_cache_term_matches_the_model_shapes(tiny):
    grow = batching.sequence_bytes(tiny, 10, 9) - batching.sequence_bytes(tiny, 10, 8)
    assert grow == TINY_KV_BYTES_PER_TOKEN


def test_estimate_covers_the_real_kv_cache(tiny, prompts):
    batch = inputs.encode(tiny, prompts)
    prompt_tokens, new_tokens = batch["input_ids"].shape[1], 6
    with torch.inference_mode():
        out = tiny.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=tiny.tokenizer.pad_token_id, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    per_sequence = real / len(prompts)
    assert per_sequence <= TINY_KV_BYTES_PER_TOKEN * (prompt_tokens + new_tokens)
    assert per_sequence <= batching.sequence_bytes(tiny, prompt_tokens, new_tokens)


def test_batch_is_the_power_of_two_that_fits(tiny):
    per_sequence = batching.SAFETY * batching.sequence_bytes(tiny, 32, 16)
    budget = int(per_sequence * 10.5)
    assert batching.auto_batch_size(tiny, 32, 16, "cpu", available_bytes=budget, fraction=1.0, cap=1000) == 8
    assert batching.auto_batch_size(tiny, 32, 16, "cpu", available_bytes=budget, fraction=0.5, cap=1000) == 4
    assert batching.auto_batch_size(tiny, 32, 16, "cpu", available_bytes=budget, fraction=1.0, cap=6) == 6


def test_limits(tiny):
    assert batching.auto_batch_size(tiny, 32, 16, "cpu", available_bytes=1) == 1
    assert batching.auto_batch_size(tiny, 32, 16, "cpu", available_bytes=1 << 50) == batching.CPU_CAP
    own_cap = batching.CUDA_CAP if tiny.info.device.type == "cuda" else batching.CPU_CAP
    assert 1 <= batching.auto_batch_size(tiny, 32, 16) <= own_cap  # the model's device, measured memory
    budget = 1 << 26
    sizes = [batching.auto_batch_size(tiny, p, n, "cpu", available_bytes=budget, cap=1 << 20)
             for p, n in [(16, 16), (64, 16), (64, 64), (256, 256)]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    recompute = batching.auto_batch_size(tiny, 64, 64, "cpu", available_bytes=budget, cap=1 << 20, kv_cache=False)
    assert recompute <= sizes[2]
    with pytest.raises(ValueError):
        batching.sequence_bytes(tiny, 0, 4)
    with pytest.raises(ValueError):
        batching.auto_batch_size(tiny, 8, 8, "cpu", available_bytes=1 << 30, fraction=0)


def test_capture_estimate_counts_every_position_logit(tiny):
    vocab = tiny.model.config.vocab_size
    assert batching.sequence_bytes(tiny, 20, 0) >= 20 * vocab * 4


def test_available_memory_is_plausible():
    free = batching.available_memory("cpu")
    total = batching.os.sysconf("SC_PHYS_PAGES") * batching.os.sysconf("SC_PAGE_SIZE")
    assert 0 < free <= total


@pytest.mark.parametrize(("n", "batch", "expected"), [(520, 512, 260), (64, 32, 32), (5, 32, 5), (65, 32, 22)])
def test_balanced(n, batch, expected):
    assert batching.balanced(n, batch) == expected


def test_generate_and_collect_choose_a_batch_when_none_is_given(tiny, monkeypatch):
    chosen = []
    real = batching.auto_batch_size

    def spy(*args, **kwargs):
        chosen.append(real(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(generation, "auto_batch_size", spy)
    monkeypatch.setattr(capture, "auto_batch_size", spy)
    prompts = ["how do i bake bread", "write a poem"]
    assert generation.generate(tiny, prompts, 3, batch_size=None) == generation.generate(tiny, prompts, 3, 1)
    auto = capture.collect(tiny, prompts, [1], batch_size=None)["resid_pre"]
    assert torch.allclose(auto, capture.collect(tiny, prompts, [1], batch_size=1)["resid_pre"], atol=1e-5)
    assert len(chosen) == 2 and all(b >= 1 for b in chosen)
