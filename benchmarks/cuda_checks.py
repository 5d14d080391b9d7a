"""What the GPU numbers rest on, checked on the benchmark's device with the test suite's tiny random Llama
(``python -m pytest -p benchmarks.cuda_plugin benchmarks/cuda_checks.py``; benchmarks/gpu.sh runs it): hooks,
orthogonalised weights and the paper's loop give the same greedy tokens in float32 and stay within the model's own
rounding in bfloat16; capture matches ``output_hidden_states``; the batch-size estimate fits the free memory."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.common import hf_greedy, recompute_greedy
from lib import ablation, batching, capture, inputs, models
from lib.artifacts import REPO_ROOT

PROMPTS = ["how do i bake bread", "tell me a joke about the cat", "write a poem",
           "explain why the sky is blue please help with homework"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("suite_conftest", REPO_ROOT / "tests" / "conftest.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    root = tmp_path_factory.mktemp("tiny-device")
    tokenizer = suite.build_tokenizer()
    suite.build_model(len(tokenizer)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    models.register_families({"tiny-device": {"base": {"local": str(root)}, "template": suite.PAPER_TEMPLATE,
                                              "add_special_tokens": True, "variants": {"base": {"adapters": []}}}})
    return "tiny-device"


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def lm(request, family, bench_device):
    return models.load(family, "base", device=str(bench_device), dtype=request.param)


def direction(d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference(family, bench_device):  # float32 on the same device: what bfloat16 results are measured against
    return models.load(family, "base", device=str(bench_device), dtype="float32")


def test_hooks_orthogonalised_and_recompute_loop_agree(lm, reference):
    batch = inputs.encode(lm, PROMPTS)
    r = direction(lm.info.d_model)
    with ablation.ablated(lm, r):
        hooked = hf_greedy(lm, batch, 8)
        recomputed = recompute_greedy(lm, batch, 8)
    with ablation.orthogonalized(lm, r):
        baked = hf_greedy(lm, batch, 8)
    plain = hf_greedy(lm, batch, 8)
    assert torch.equal(hooked, recomputed)
    assert not torch.equal(hooked, plain)
    if lm.info.dtype == torch.float32:
        assert torch.equal(hooked, baked)
    else:  # bfloat16 rounds the hooked sums and the edited weights differently, and near-ties then flip greedy
        # tokens after the first few: the first new token must match float32's (3 of 4 prompts at least)
        with ablation.ablated(reference, r):
            exact = hf_greedy(reference, inputs.encode(reference, PROMPTS), 8)
        for tokens in (hooked, baked):  # new tokens only: column 0 is the first
            assert (tokens[:, 0] == exact[:, 0]).sum() >= 3


def test_orthogonalised_logits_match_hooks(lm, reference):
    """Hooks and orthogonalised weights give the same logits in float32; in bfloat16 each stays within twice the
    model's own bfloat16 rounding error (plain bfloat16 against plain float32) of the float32 ablated logits."""
    batch = inputs.encode(lm, PROMPTS)
    r = direction(lm.info.d_model, 2)
    with torch.inference_mode():
        with ablation.ablated(lm, r):
            hooked = inputs.forward(lm, batch).logits.float()
        with ablation.orthogonalized(lm, r):
            baked = inputs.forward(lm, batch).logits.float()
        if lm.info.dtype == torch.float32:
            assert (hooked - baked).abs().max().item() < 1e-3
            return
        with ablation.ablated(reference, r):
            exact = inputs.forward(reference, batch).logits.float()
        rounding = (inputs.forward(lm, batch).logits.float() - inputs.forward(reference, batch).logits.float())
    budget = 2 * rounding.abs().max().item()
    assert (hooked - exact).abs().max().item() < budget
    assert (baked - exact).abs().max().item() < budget


def test_capture_matches_hidden_states(lm):
    acts = capture.collect(lm, PROMPTS, sites=("resid_pre",))["resid_pre"]
    with torch.inference_mode():
        states = inputs.forward(lm, inputs.encode(lm, PROMPTS), output_hidden_states=True).hidden_states
    expected = torch.stack([states[layer][:, -1] for layer in range(lm.info.n_layers)], 1).float().cpu()
    order = capture.order_by_length(lm, PROMPTS)  # collect batches by length; one batch here, rows in prompt order
    assert sorted(order) == list(range(len(PROMPTS)))
    assert torch.allclose(acts, expected, atol=1e-5 if lm.info.dtype == torch.float32 else 0.0)


def test_model_on_the_device_and_a_batch_that_fits_it(lm, bench_device):
    assert {p.device.type for p in lm.model.parameters()} == {bench_device.type} == {lm.info.device.type}
    assert inputs.encode(lm, PROMPTS)["input_ids"].device.type == bench_device.type
    size = batching.auto_batch_size(lm, 64, 64)
    assert 1 <= size <= (batching.CUDA_CAP if bench_device.type == "cuda" else batching.CPU_CAP)
    assert size * batching.sequence_bytes(lm, 64, 64) <= batching.available_memory(bench_device)
