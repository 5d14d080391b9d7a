"""lib.ablation: hook ablation, weight orthogonalisation (same logits), activation addition, bad directions."""

import pytest
import torch

from lib import ablation, capture, generation, inputs


def logits(lm, prompts):
    with torch.no_grad():
        return lm.model(**inputs.encode(lm, prompts)).logits


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
    storage = {name: p.data_ptr() for name, p in tiny.model.named_parameters()}
    reference = logits(tiny, prompts)
    with ablation.orthogonalized(tiny, random_direction(64)):
        assert tiny.model.lm_head.weight is not tiny.model.model.embed_tokens.weight
        # the unembedding reads the original embedding itself, not a copy of it
        assert tiny.model.lm_head.weight.data_ptr() == storage["model.embed_tokens.weight"]
    assert tiny.model.lm_head.weight is tiny.model.model.embed_tokens.weight
    for name, p in tiny.model.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.data_ptr() == storage[name], f"{name}: restored from a copy, not the original tensor"
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


# --- Mean ablation: a - (a R^T - m) R, m the harmless mean coordinates at each site ----------------------------------

# Equal token lengths (the tiny tokenizer is word-level), so that every position after the first can be captured.
REFERENCE = ["how do i bake bread", "tell me a joke please", "write a poem about cat", "explain why sky is blue"]


@pytest.fixture
def site_means(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path))
    return capture.site_statistics(tiny, REFERENCE, batch_size=3)["mean"]


def test_site_statistics_average_the_last_token_or_every_token_but_the_first(tiny, site_means, tmp_path):
    length = len(inputs.encode(tiny, REFERENCE[:1])["input_ids"][0])
    acts = capture.collect(tiny, REFERENCE, sites=("resid_pre", "resid_mid", "resid_post"),
                           positions=list(range(length)))

    def per_site(average):  # [layers, 3, d]: block input, attention output, MLP output
        pre, mid, post = (average(acts[site]) for site in ("resid_pre", "resid_mid", "resid_post"))
        return torch.stack([pre, mid - pre, post - mid], dim=1)

    torch.testing.assert_close(site_means, per_site(lambda v: v[:, :, -1].mean(0)), atol=1e-5, rtol=1e-5)
    rest = capture.site_statistics(tiny, REFERENCE, batch_size=3, positions="rest")
    torch.testing.assert_close(rest["mean"], per_site(lambda v: v[:, :, 1:].mean((0, 2))), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest["first"][:, 0], acts["resid_pre"][:, :, 0].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest["mean_square"][:, 0], acts["resid_pre"][:, :, 1:].square().mean((0, 2)),
                               atol=1e-4, rtol=1e-5)
    assert len(list(tmp_path.glob("site-statistics/tiny-llama/base/*.safetensors"))) == 2  # one per position set
    capture.site_statistics(tiny, REFERENCE, batch_size=3, positions="rest")
    assert len(list(tmp_path.glob("site-statistics/tiny-llama/base/*.safetensors"))) == 2  # reused, not recomputed
    with pytest.raises(ValueError, match="Unknown position set 'first'"):
        capture.site_statistics(tiny, REFERENCE, positions="first")


@pytest.mark.parametrize("k", [1, 2])
def test_mean_ablation_hooks_match_weights(tiny, prompts, site_means, k):
    directions = torch.stack([random_direction(64, s) for s in range(k)])
    with ablation.ablated(tiny, directions, mode="mean", means=site_means):
        hooked = logits(tiny, prompts)
    with ablation.orthogonalized(tiny, directions, mode="mean", means=site_means):
        baked = logits(tiny, prompts)
        assert all(tiny.info.submodule(0, role).o_proj.bias is not None for role in ("attn",))
    with ablation.orthogonalized(tiny, directions):
        zero = logits(tiny, prompts)
    assert (hooked - baked).abs().max() < 1e-4
    assert (hooked - zero).abs().max() > 1e-2  # the means matter
    assert tiny.info.submodule(0, "attn").o_proj.bias is None  # the added biases are gone again
    assert torch.equal(logits(tiny, prompts), logits(tiny, prompts))


def test_mean_ablation_generation_hooks_equal_weights(tiny, prompts, site_means):
    direction = random_direction(64, 3)
    with ablation.ablated(tiny, direction, mode="mean", means=site_means):
        hooked = generation.generate(tiny, prompts, max_new_tokens=8)
    with ablation.orthogonalized(tiny, direction, mode="mean", means=site_means):
        baked = generation.generate(tiny, prompts, max_new_tokens=8)
    assert hooked == baked


def test_mean_ablation_keeps_the_harmless_mean_projection(tiny, prompts, site_means):
    """Every residual site of every layer, at every position, sits at the clean harmless mean along the direction
    (at the last token, where the means are taken): the variation along it is gone, the offset is kept (zero
    ablation would move it to 0), and the harmless mean projection is what it was."""
    direction = random_direction(64, 5)
    unit = direction / direction.norm()
    sites = ("resid_pre", "resid_mid", "resid_post")
    clean = capture.collect(tiny, REFERENCE, sites=sites)  # last token
    clean_mean = {site: (values @ unit).mean(0) for site, values in clean.items()}  # [layers]
    with ablation.ablated(tiny, direction, mode="mean", means=site_means):
        ablated = capture.collect(tiny, prompts + REFERENCE, sites=sites, positions=[0, -1])
    for site in sites:
        along = ablated[site] @ unit  # [n, layers, 2]
        torch.testing.assert_close(along, clean_mean[site][None, :, None].expand_as(along), atol=1e-4, rtol=1e-4)
        assert clean_mean[site].abs().max() > 1e-2, site  # a real offset, not a trivial zero
    with ablation.ablated(tiny, direction, mode="mean", means=site_means):
        after = capture.collect(tiny, REFERENCE, sites=sites)
    for site in sites:
        torch.testing.assert_close((after[site] @ unit).mean(0), clean_mean[site], atol=1e-4, rtol=1e-4)


def test_mean_ablation_of_partial_layers_matches_per_site_targets(tiny, prompts, site_means):
    """With a block input hook only where a run of ablated layers starts, the later inputs still land on their
    own targets (the three targets of the previous block add up to them)."""
    direction = random_direction(64, 6)
    unit = direction / direction.norm()
    with ablation.ablated(tiny, direction, layers=[1, 2], mode="mean", means=site_means):
        acts = capture.collect(tiny, prompts, sites=("resid_pre",))["resid_pre"]
    torch.testing.assert_close(acts[:, 1:3] @ unit, (site_means[1:3, 0] @ unit).expand(len(prompts), 2),
                               atol=1e-4, rtol=1e-4)


def test_mean_ablation_at_block_inputs_resets_each_input_and_keeps_each_blocks_writes(tiny, prompts, site_means):
    """The second definition: every block input lands on its harmless mean along the direction, while the block's
    attention and MLP writes along it stay as the prompt makes them (so resid_mid and resid_post are not reset)."""
    direction = random_direction(64, 7)
    unit = direction / direction.norm()
    sites = ("resid_pre", "resid_mid", "resid_post")
    with ablation.ablated(tiny, direction, mode="mean", means=site_means, sites=ablation.BLOCK_INPUTS):
        acts = capture.collect(tiny, prompts, sites=sites)
    targets = site_means @ unit  # [layers, 3]
    torch.testing.assert_close(acts["resid_pre"] @ unit, targets[:, 0].expand(len(prompts), -1), atol=1e-4, rtol=1e-4)
    writes = acts["resid_mid"] @ unit - acts["resid_pre"] @ unit  # the attention outputs along the direction
    assert (writes - targets[:, 1]).abs().max() > 1e-3  # left as the prompts make them
    with ablation.ablated(tiny, direction, mode="mean", means=site_means):
        everywhere = logits(tiny, prompts)
    with ablation.ablated(tiny, direction, mode="mean", means=site_means, sites=["mlp_out", "resid_pre", "attn_out"]):
        listed = logits(tiny, prompts)
    with ablation.ablated(tiny, direction, mode="mean", means=site_means, sites=ablation.BLOCK_INPUTS):
        inputs_only = logits(tiny, prompts)
    assert (everywhere - listed).abs().max() < 1e-5  # every site, in any order, is the default
    assert (everywhere - inputs_only).abs().max() > 1e-3


def test_interventions_at_block_inputs_use_hooks_and_their_own_cache_key(tiny, prompts, site_means):
    direction = random_direction(64, 8)
    inputs = ablation.Intervention("ablate", direction, mode="mean", means=site_means, sites=["resid_pre"])
    assert inputs.sites == ablation.BLOCK_INPUTS and ablation.orthogonalizable(tiny)
    with inputs.applied(tiny):
        applied = logits(tiny, prompts)
    with ablation.ablated(tiny, direction, mode="mean", means=site_means, sites=ablation.BLOCK_INPUTS):
        hooked = logits(tiny, prompts)
    assert torch.equal(applied, hooked)
    every = ablation.Intervention("ablate", direction, mode="mean", means=site_means)
    assert every.key() != inputs.key()
    with pytest.raises(ValueError, match="non-empty subset"):
        ablation.Intervention("ablate", direction, sites=("resid_mid",))
    with pytest.raises(ValueError, match="non-empty subset"):
        with ablation.ablated(tiny, direction, sites=()):
            pass


def test_bad_ablation_modes(tiny, site_means):
    direction = random_direction(64)
    with pytest.raises(ValueError, match="Unknown ablation mode 'median'"):
        with ablation.ablated(tiny, direction, mode="median"):
            pass
    with pytest.raises(ValueError, match="needs the target model's site means"):
        with ablation.orthogonalized(tiny, direction, mode="mean"):
            pass
    with pytest.raises(ValueError, match=r"shape \[4, 3, 64\]"):
        with ablation.ablated(tiny, direction, mode="mean", means=site_means[:2]):
            pass
    with pytest.raises(ValueError, match="only used by mode='mean'"):
        with ablation.ablated(tiny, direction, means=site_means):
            pass
    with pytest.raises(ValueError, match="reference prompts"):
        ablation.ablation_means(tiny, "mean", [])
    with pytest.raises(ValueError, match="Site means go with"):
        ablation.Intervention("ablate", direction, mode="mean")
    assert ablation.ablation_means(tiny, "zero") is None
    zero, mean = (ablation.Intervention("ablate", direction),
                  ablation.Intervention("ablate", direction, mode="mean", means=site_means))
    assert zero.key() != mean.key() and "mean" in mean.key()
    assert mean.key() != ablation.Intervention("ablate", direction, mode="mean", means=site_means + 1).key()
