"""lib.ablation: hook ablation, weight orthogonalisation (same logits), activation addition, bad directions."""

import pytest
import torch

from lib import ablation, capture, generation, models


def logits(lm, prompts):
    with torch.no_grad():
        return lm.model(**models.encode(lm, prompts)).logits


def random_direction(d, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=generator)


@pytest.mark.parametrize("k", [1, 2])
def test_orthogonalised_weights_match_hooks(tiny, prompts, k):
    directions = torch.stack([random_direction(64, s) for s in range(k)])
    with ablation.ablated(tiny, directions):
        hooked = logits(tiny, prompts)
    with ablation.orthogonalized(tiny, directions):
        baked = logits(tiny, prompts)
    plain = logits(tiny, prompts)
    assert (hooked - baked).abs().max() < 1e-4
    assert (hooked - plain).abs().max() > 1e-2  # the ablation does change the model


def test_orthogonalisation_restores_weights_and_tie(tiny, prompts):
    before = {name: p.clone() for name, p in tiny.model.named_parameters()}
    reference = logits(tiny, prompts)
    with ablation.orthogonalized(tiny, random_direction(64)):
        assert tiny.model.lm_head.weight is not tiny.model.model.embed_tokens.weight
    assert tiny.model.lm_head.weight is tiny.model.model.embed_tokens.weight
    for name, p in tiny.model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert torch.equal(logits(tiny, prompts), reference)


def test_ablated_residuals_have_no_component_along_direction(tiny, prompts):
    direction = random_direction(64)
    unit = direction / direction.norm()
    with ablation.ablated(tiny, direction):
        acts = capture.collect(tiny, prompts, sites=("resid_pre", "resid_mid", "resid_post"))
    for site, values in acts.items():
        assert (values @ unit).abs().max() < 1e-4, site
    assert not tiny.info.layers[0]._forward_pre_hooks  # hooks removed on exit


def test_hooks_skip_block_inputs_that_are_already_orthogonal(tiny, prompts):
    """Llama blocks add their attention and MLP outputs unchanged: only the first block of each run of ablated
    layers needs an input hook; the residuals are still orthogonal at every site of the ablated layers."""
    basis = ablation.check_directions(random_direction(64), 64)
    all_layers = ablation.ablation_hooks(tiny.info, basis)
    assert [kind for _, kind, _ in all_layers].count("pre") == 1 and len(all_layers) == 1 + 2 * 4
    runs = ablation.ablation_hooks(tiny.info, basis, layers=[0, 1, 3])
    assert [module for module, kind, _ in runs if kind == "pre"] == [tiny.info.layers[0], tiny.info.layers[3]]
    unit = basis[0]
    with ablation.ablated(tiny, basis, layers=[1, 2]):
        acts = capture.collect(tiny, prompts, sites=("resid_pre", "resid_mid", "resid_post"))
    for site in ("resid_pre", "resid_mid", "resid_post"):
        along = (acts[site] @ unit).abs()  # [n, layers]
        assert along[:, 1:3].max() < 1e-4, site
        assert along[:, 0].max() > 1e-2, site  # layer 0 is not ablated


def test_blocks_with_post_norms_keep_every_input_hook(tiny_family):
    """A block with a norm after its MLP output (Gemma 2, OLMo 2) changes the projected outputs before adding them:
    there every block input is projected."""
    from lib import models

    lm = models.load("tiny-llama", "base", device="cpu")
    assert ablation.adds_outputs_unchanged(lm.info, 0)
    for block in lm.info.layers:
        block.post_feedforward_layernorm = torch.nn.Identity()
    assert not ablation.adds_outputs_unchanged(lm.info, 0)
    hooks = ablation.ablation_hooks(lm.info, ablation.check_directions(random_direction(64), 64))
    assert [kind for _, kind, _ in hooks].count("pre") == 4


def test_generation_with_hooks_equals_orthogonalised(tiny, prompts):
    direction = random_direction(64, 3)
    with ablation.ablated(tiny, direction):
        hooked = generation.generate(tiny, prompts, max_new_tokens=8)
    with ablation.orthogonalized(tiny, direction):
        baked = generation.generate(tiny, prompts, max_new_tokens=8)
    assert hooked == baked
    assert hooked != generation.generate(tiny, prompts, max_new_tokens=8)


def test_activation_addition_shifts_resid_pre_at_layer(tiny, prompts):
    direction = random_direction(64)
    plain = capture.collect(tiny, prompts, layers=[2])["resid_pre"]
    with ablation.added(tiny, direction, layer=2, coefficient=2.0):
        shifted = capture.collect(tiny, prompts, layers=[2])["resid_pre"]
    torch.testing.assert_close(shifted - plain, (2.0 * direction).expand_as(plain), atol=1e-5, rtol=1e-5)


def test_check_directions_orthonormalises():
    basis = ablation.check_directions(torch.tensor([[3.0, 0, 0], [1.0, 1.0, 0]]), 3)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2))


@pytest.mark.parametrize("direction, message", [
    (torch.ones(32), r"shape \[64\]"),
    (torch.ones(2, 3, 64), "shape"),
    (torch.zeros(64), "zero vector"),
    (torch.full((64,), float("nan")), "NaN"),
    (torch.stack([torch.ones(64), 2 * torch.ones(64)]), "linearly dependent"),
])
def test_bad_directions(tiny, direction, message):
    with pytest.raises(ValueError, match=message):
        with ablation.ablated(tiny, direction):
            pass


def test_bad_addition(tiny):
    with pytest.raises(ValueError, match="shape"):
        with ablation.added(tiny, torch.ones(3), layer=0):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with ablation.added(tiny, torch.ones(64), layer=7):
            pass
