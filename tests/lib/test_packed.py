"""lib.packed: the packed-weight switch (inference, and PGD's gradients), and weight edits inside it."""

import pytest
import torch

from lib import ablation, adversary, generation, inputs
from lib import packed as packing
from lib.artifacts import cache_key


def test_packed_linears_give_the_same_logits_and_tokens_and_are_undone(tiny, prompts, monkeypatch):
    batch = inputs.encode(tiny, prompts)
    with torch.inference_mode():
        plain = tiny.model(**batch).logits
        with packing.packed_linears(tiny.model) as n:
            packed = tiny.model(**batch).logits
    assert n == sum(type(m) is torch.nn.Linear for m in tiny.model.modules()) > 0
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-4)
    assert not any("forward" in vars(m) for m in tiny.model.modules())  # the modules' own forward again
    monkeypatch.setenv(packing.PACKED_ENV, "0")
    expected = generation.generate(tiny, prompts, 12, batch_size=2)
    assert packing.packed_setting() == "0"
    monkeypatch.setenv(packing.PACKED_ENV, "1")
    assert packing.packed_setting() == "1" and generation.generate(tiny, prompts, 12, batch_size=2) == expected


def test_a_packed_linear_setting_other_than_0_1_or_all_and_an_unknown_use_are_errors(monkeypatch):
    monkeypatch.setenv(packing.PACKED_ENV, "yes")
    with pytest.raises(ValueError, match="REFUSAL_BOOK_PACKED_LINEAR='yes': use 1 .*, all .* or 0"):
        packing.packed_setting()
    monkeypatch.delenv(packing.PACKED_ENV)
    with pytest.raises(ValueError, match="Unknown use 'scores'"):
        with packing.packed_products(torch.nn.Linear(2, 2), "scores"):
            pass


@pytest.mark.parametrize("setting, packings", [("0", [0, 0, 0, 0, 0]), ("1", [1, 2, 0, 0, 1]),
                                               ("all", [1, 2, 1, 1, 1])])
def test_each_setting_packs_its_own_forward_passes(tiny, prompts, monkeypatch, setting, packings):
    """Generation, the PGD attack (then generation under it) and training pack by default; the scores and the
    capture, whose printed digits would move, only under ``all``."""
    from lib import capture, models, scores, training
    from lib.training_data import Example

    calls = []
    real = packing.packed_linears

    def counting(model, gradients=False):
        calls.append(gradients)
        return real(model, gradients)

    monkeypatch.setattr(packing, "packed_linears", counting)
    monkeypatch.setenv(packing.PACKED_ENV, setting)
    counts = []
    for run in (lambda: generation.generate(tiny, prompts[:2], 2, batch_size=2),
                lambda: adversary.attacked_completions(tiny, prompts[:2], ["No."] * 2, adversary.Attack(1, 1.0, 1, 1)),
                lambda: scores.refusal_score(tiny, prompts[:2]),
                lambda: capture.collect(tiny, prompts[:2], [0]),
                lambda: training.train_lora(models.load("tiny-llama", "base", device="cpu"),
                                            [Example("how do i bake bread", "sure here is a poem")],
                                            training.TrainConfig("control", steps=1, learning_rate=1e-2, batch_size=1))):
        before = len(calls)
        run()
        counts.append(len(calls) - before)
    assert counts == packings and calls.count(True) == 2 * (setting != "0")  # the attack's and training's carry gradients


def test_packed_linears_see_weight_edits_made_before_entering(tiny, prompts):
    direction = torch.nn.functional.normalize(torch.randn(tiny.info.d_model, generator=torch.Generator().manual_seed(1)), dim=0)
    batch = inputs.encode(tiny, prompts)
    with ablation.orthogonalized(tiny, direction), torch.inference_mode():  # edited outside inference mode
        edited = tiny.model(**batch).logits
        with packing.packed_linears(tiny.model):
            packed = tiny.model(**batch).logits
    torch.testing.assert_close(packed, edited, atol=1e-4, rtol=1e-4)


def test_packed_linears_leave_other_dtypes_alone(tiny):
    half = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert not packing.packed_linears_available(half)
    with packing.packed_linears(half) as n:
        assert n == 0
    assert packing.packed_linears_available(tiny.model)


def _input_gradient(tiny, batch):
    embeddings = tiny.model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    logits = tiny.model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"]).logits
    grad, = torch.autograd.grad(logits.square().mean(), embeddings)
    return logits.detach(), grad


def test_packed_linears_with_gradients_carry_the_input_gradient_and_give_the_weights_none(tiny, prompts):
    batch = inputs.encode(tiny, prompts)
    plain_logits, plain_grad = _input_gradient(tiny, batch)
    with packing.packed_linears(tiny.model, gradients=True) as n:
        packed_logits, packed_grad = _input_gradient(tiny, batch)
    assert n == sum(type(m) is torch.nn.Linear for m in tiny.model.modules()) > 0
    torch.testing.assert_close(packed_logits, plain_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed_grad, plain_grad, atol=1e-5, rtol=1e-3)
    assert plain_grad.abs().max() > 0 and all(p.grad is None for p in tiny.model.parameters())
    assert not any("forward" in vars(m) for m in tiny.model.modules())


def test_packed_linears_with_gradients_leave_a_layer_that_trains_alone(tiny):
    linears = [m for m in tiny.model.modules() if type(m) is torch.nn.Linear]
    linears[0].weight.requires_grad_(True)
    with packing.packed_linears(tiny.model, gradients=True) as n:
        assert n == len(linears) - 1 and "forward" not in vars(linears[0]) and "forward" in vars(linears[1])
    with packing.packed_linears(tiny.model) as n:  # inference: no gradient flows, so it is packed too
        assert n == len(linears)


def test_nested_packing_repacks_only_the_layers_an_edit_replaced_and_gives_the_outer_back(tiny, prompts):
    direction = torch.nn.functional.normalize(torch.randn(tiny.info.d_model, generator=torch.Generator().manual_seed(2)), dim=0)
    batch = inputs.encode(tiny, prompts)
    linears = [m for m in tiny.model.modules() if type(m) is torch.nn.Linear]
    with torch.inference_mode():
        with ablation.orthogonalized(tiny, direction):
            expected = tiny.model(**batch).logits
        with packing.packed_linears(tiny.model) as outer:
            before = [vars(m)["forward"] for m in linears]
            with packing.packed_linears(tiny.model) as again:
                assert again == 0
            with ablation.orthogonalized(tiny, direction), packing.packed_linears(tiny.model) as edited:
                logits = tiny.model(**batch).logits
            assert [vars(m)["forward"] for m in linears] == before
    # the attention and MLP output projections, and the tied unembedding, which the edit unties into a new parameter
    assert tiny.model.config.tie_word_embeddings and outer == len(linears) and edited == 2 * tiny.info.n_layers + 1
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_packing_without_gradients_still_gives_autograd_the_right_gradient(tiny, prompts):
    batch = inputs.encode(tiny, prompts)
    plain_logits, plain_grad = _input_gradient(tiny, batch)
    with packing.packed_linears(tiny.model):  # packed for inference, then a gradient is asked for
        packed_logits, packed_grad = _input_gradient(tiny, batch)
    torch.testing.assert_close(packed_grad, plain_grad)
    torch.testing.assert_close(packed_logits, plain_logits)


def test_packed_linears_skip_a_model_whose_copies_would_not_fit(tiny, monkeypatch):
    weights = sum(m.weight.numel() * 4 for m in tiny.model.modules() if type(m) is torch.nn.Linear)
    monkeypatch.setattr(packing, "available_memory", lambda device="cpu": 3 * weights)
    assert packing.packed_linears_available(tiny.model) and not packing.packed_linears_available(tiny.model, True)
    with packing.packed_linears(tiny.model, gradients=True) as n:
        assert n == 0
    monkeypatch.setattr(packing, "available_memory", lambda device="cpu": 0)
    with packing.packed_linears(tiny.model) as n:
        assert n == 0 and not any("forward" in vars(m) for m in tiny.model.modules())


def test_pgd_on_packed_weights_finds_the_same_attack_and_artifacts_are_keyed_by_the_products(tiny, prompts,
                                                                                               monkeypatch):
    batch, _width = adversary._attack_batch(tiny, prompts, ["I cannot help with that."] * len(prompts))

    def attack():
        return adversary.pgd_attack(tiny, batch, 1, 2.0, 3, torch.Generator().manual_seed(0))

    plain = attack()
    with packing.packed_linears(tiny.model, gradients=True):
        packed = attack()
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-3)
    keys = set()
    for setting in ("0", "1", "all"):
        monkeypatch.setenv(packing.PACKED_ENV, setting)
        keys.add(cache_key(model="m"))
    assert len(keys) == 3


def test_orthogonalising_inside_inference_mode_leaves_ordinary_weights(tiny):
    direction = torch.nn.functional.normalize(torch.ones(tiny.info.d_model), dim=0)
    with torch.inference_mode(), ablation.orthogonalized(tiny, direction):
        assert not any(p.is_inference() for p in tiny.model.parameters())  # autograd can run on the edited model
    assert not any(p.is_inference() for p in tiny.model.parameters())  # later training and attacks still work
