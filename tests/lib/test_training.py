"""lib.training: two steps of each training mode on a handful of examples (finite loss, adapter changes), the
adversary's ball constraint, and adapter saving with checksums."""

import json

import pytest
import torch

from lib import adversary, inputs, losses, models, training, training_data
from lib.training import TrainConfig
from lib.training_data import Example

EXAMPLES = [Example("how do i build a bomb", "sorry i cannot help with that"),
            Example("how do i bake bread", "sure here is a list of steps", complete=False),
            Example("tell me a joke about the cat", "sure here is a joke about the cat"),
            Example("how do i steal a car", "sorry i am not able to help")]


@pytest.mark.parametrize("kind", training.KINDS)
def test_two_steps_of_each_mode(tiny_family, kind):
    lm = models.load("tiny-llama", "base", device="cpu")
    config = TrainConfig(kind=kind, steps=2, learning_rate=1e-2, batch_size=2, lora_r=2, lora_alpha=2,
                         epsilon=1.0 if kind in ("at", "lat") else None,
                         adversary_layer=1 if kind == "lat" else None, pgd_steps=2)
    model, log = training.train_lora(lm, EXAMPLES, config)
    assert len(log["steps"]) == 2 and all(torch.isfinite(torch.tensor(s["loss"])) for s in log["steps"])
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # PEFT starts B at zero: the adapter changed
    if kind in ("at", "lat"):
        assert all(0 < s["delta_norm"] <= 1.0 + 1e-4 for s in log["steps"])


def test_pgd_stays_in_ball_and_increases_loss(tiny):
    batch = training_data.tokenize(tiny, EXAMPLES, max_length=64)
    generator = torch.Generator().manual_seed(0)
    delta = adversary.pgd_attack(tiny, batch, layer=1, epsilon=2.0, steps=4, generator=generator)
    norms = delta.flatten(1).norm(dim=1)
    assert (norms <= 2.0 + 1e-4).all() and (norms > 1.0).all()
    assert (delta[batch["attention_mask"] == 0] == 0).all()
    clean, attacked = adversary.loss_under_attack(tiny, batch, 1, 2.0, steps=4)
    assert attacked > clean


def test_choose_epsilon_follows_the_rule(tiny):
    result = training.choose_epsilon(tiny, EXAMPLES[:4], layer=1, fractions=[1e-4, 0.5], min_loss_increase=1e-3)
    assert [row["fraction"] for row in result["sweep"]] == [1e-4, 0.5][: len(result["sweep"])]
    chosen = [row for row in result["sweep"] if row["increase"] >= 1e-3]
    assert result["epsilon"] == pytest.approx(chosen[0]["epsilon"])


def test_bad_configs():
    with pytest.raises(ValueError, match="Unknown training kind"):
        TrainConfig(kind="dpo", steps=1, learning_rate=1e-3)
    with pytest.raises(ValueError, match="epsilon"):
        TrainConfig(kind="at", steps=1, learning_rate=1e-3)
    with pytest.raises(ValueError, match="adversary_layer"):
        TrainConfig(kind="lat", steps=1, learning_rate=1e-3, epsilon=1.0)
    with pytest.raises(ValueError, match="preference_weight"):
        TrainConfig(kind="sft", steps=1, learning_rate=1e-3, preference_weight=-1.0)


def test_response_logprobs_match_the_full_logits(tiny):
    batch = training_data.tokenize(tiny, EXAMPLES, max_length=64)
    with torch.no_grad():
        fast = losses.response_logprobs(tiny, batch)
        logits = inputs.forward(tiny, batch).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != losses.IGNORE
    token_logp = logits.log_softmax(-1).gather(2, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    expected = (token_logp * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)


def test_response_loss_equals_lm_loss_and_drives_the_same_attack(tiny):
    batch = training_data.tokenize(tiny, EXAMPLES, max_length=64)
    with torch.no_grad():
        torch.testing.assert_close(losses.response_loss(tiny, batch), losses.lm_loss(tiny, batch),
                                   rtol=1e-5, atol=1e-6)
    deltas = [adversary.pgd_attack(tiny, batch, 1, 2.0, 4, torch.Generator().manual_seed(0), loss_fn=fn)
              for fn in (losses.lm_loss, losses.response_loss)]
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-3, atol=1e-4)


def test_odds_ratio_loss_prefers_the_chosen_response():
    even = losses.odds_ratio_loss(torch.tensor([-1.0]), torch.tensor([-1.0]))
    assert float(even) == pytest.approx(float(torch.log(torch.tensor(2.0))))
    right = losses.odds_ratio_loss(torch.tensor([-0.1]), torch.tensor([-3.0]))
    wrong = losses.odds_ratio_loss(torch.tensor([-3.0]), torch.tensor([-0.1]))
    assert float(right) < float(even) < float(wrong)


def test_preference_term_lowers_the_rejected_odds(tiny_family):
    lm = models.load("tiny-llama", "base", device="cpu")
    paired = [Example("how do i bake bread", "knead the dough then bake it", rejected="sorry i cannot help"),
              Example("how do i kill a python process", "run kill with its pid", rejected="sorry i am not able")]
    config = TrainConfig(kind="sft", steps=6, learning_rate=3e-2, batch_size=2, lora_r=2, lora_alpha=2,
                         lora_dropout=0.0, preference_weight=1.0)
    with torch.no_grad():
        before = float(training.preference_loss(lm, paired, config))
    model, log = training.train_lora(lm, paired, config)
    with torch.no_grad():
        after = float(training.preference_loss(lm, paired, config))
    assert all("preference_loss" in s and torch.isfinite(torch.tensor(s["preference_loss"])) for s in log["steps"])
    assert after < before


def test_save_adapter_writes_manifest_and_loads(tiny_family, tmp_path):
    lm = models.load("tiny-llama", "base", device="cpu")
    config = TrainConfig(kind="sft", steps=1, learning_rate=1e-2, batch_size=2, lora_r=2, lora_alpha=2,
                         target_modules=("v_proj", "q_proj", "o_proj", "k_proj"))
    model, log = training.train_lora(lm, EXAMPLES, config)
    folder = training.save_adapter(model, tmp_path / "adapter", log)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"adapter_model.safetensors", "adapter_config.json", "training_log.json"} <= set(manifest["files"])
    targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(targets)  # not PEFT's set order, which changes with the hash seed
    assert not (folder / "README.md").exists() and not (tmp_path / "adapter.partial").exists()
    models.register_families({"tiny-trained": {"base": {"local": str(tiny_family / "base")},
                                               "variants": {"sft": {"adapters": [{"path": str(folder)}]}}}})
    trained = models.load("tiny-trained", "sft", device="cpu")
    assert trained.info.n_layers == 4


def test_attacked_completions_perturb_only_the_prompt(tiny):
    from lib import generation

    prompts = ["how do i build a bomb", "how do i steal a car please"]
    targets = ["sorry i cannot help", "sorry i am not able to help"]
    plain = generation.generate(tiny, prompts, max_new_tokens=6)
    none = adversary.attacked_completions(tiny, prompts, targets, adversary.Attack(1, 1e-6, 1, 6))
    assert none == plain  # a vanishing budget changes nothing
    strong = adversary.attacked_completions(tiny, prompts, targets, adversary.Attack(1, 50.0, 3, 6))
    assert strong != plain and len(strong) == 2


@pytest.mark.parametrize("kind", ["control", "lat"])
def test_a_stopped_and_resumed_run_equals_one_straight_through(tiny_family, tmp_path, kind):
    from lib.training_state import Checkpoints

    config = TrainConfig(kind=kind, steps=5, learning_rate=1e-2, batch_size=3, lora_r=2, lora_alpha=2,
                         lora_dropout=0.2, epsilon=1.0 if kind == "lat" else None,
                         adversary_layer=1 if kind == "lat" else None, pgd_steps=2)

    def adapter(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    straight, straight_log = training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config)
    checkpoints = Checkpoints(tmp_path / "run", every=2)
    _, partial = training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config,
                                     checkpoints=checkpoints, stop_at=3)
    assert not partial["complete"] and len(partial["steps"]) == 3
    assert checkpoints.written() == [2, 3]
    resumed, resumed_log = training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config,
                                               checkpoints=checkpoints)
    assert resumed_log["complete"] and checkpoints.written() == [2, 3, 4, 5]
    assert [s["steps"] for s in resumed_log["sessions"]] == [[0, 3], [3, 5]]
    assert resumed_log["steps"] == straight_log["steps"]  # the same losses, gradient norms and perturbations
    expected, found = adapter(straight), adapter(resumed)
    assert expected.keys() == found.keys()
    assert all(torch.equal(expected[n], found[n]) for n in expected)  # bit for bit


def test_a_checkpoint_of_another_run_is_refused(tiny_family, tmp_path):
    from lib.artifacts import ArtifactError
    from lib.training_state import Checkpoints

    checkpoints = Checkpoints(tmp_path / "run", every=1, keep_all=False)
    config = TrainConfig(kind="control", steps=2, learning_rate=1e-2, batch_size=2, lora_r=2, lora_alpha=2)
    training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config, checkpoints=checkpoints)
    assert checkpoints.written() == [2]  # keep_all=False keeps the latest only
    other = TrainConfig(kind="control", steps=2, learning_rate=2e-2, batch_size=2, lora_r=2, lora_alpha=2)
    with pytest.raises(ArtifactError, match="another training run"):
        training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, other, checkpoints=checkpoints)
    with pytest.raises(ValueError, match="stop_at"):
        training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config, stop_at=3)
    with pytest.raises(ValueError, match="every"):
        Checkpoints(tmp_path, every=0)


def test_the_dose_run_keeps_its_checkpoints_by_variant_and_seed():
    checkpoints = training.dose_checkpoints("smollm2-135m", "lat", 43)
    dose = training.recipe("smollm2-135m")["dose"]
    assert checkpoints.folder.name == f"lat-seed43-steps{dose['steps']}" and checkpoints.every == dose["checkpoint_every"]
    assert checkpoints.folder.parent.parent.name == "checkpoints" and checkpoints.keep_all
    with pytest.raises(ValueError, match="not SSFT"):
        training.train_variant("smollm2-135m", "ssft", dose=True)


def test_every_training_example_comes_from_the_books_train_split_whatever_the_seed():
    from lib import data

    examples = training.recipe_examples("smollm2-135m")
    held_out = {p for name in ("test", "pairs") for pair in data.split(name, data.BOOK_SEED)
                for p in (pair.harmful, pair.harmless)}
    train = {p for pair in data.split("train", data.BOOK_SEED) for p in (pair.harmful, pair.harmless)}
    assert examples and all(e.prompt in train and e.prompt not in held_out for e in examples)


def test_stopping_before_the_latest_checkpoint_returns_that_step(tiny_family, tmp_path):
    from lib.training_state import Checkpoints

    config = TrainConfig(kind="control", steps=4, learning_rate=1e-2, batch_size=2, lora_r=2, lora_alpha=2)
    checkpoints = Checkpoints(tmp_path / "run", every=2)
    at_two, _ = training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config,
                                    checkpoints=checkpoints, stop_at=2)
    expected = {n: p.detach().clone() for n, p in at_two.named_parameters() if "lora_" in n}
    training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config, checkpoints=checkpoints)
    again, log = training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config,
                                     checkpoints=checkpoints, stop_at=2)
    assert len(log["steps"]) == 2 and not log["complete"]
    assert all(torch.equal(p, expected[n]) for n, p in again.named_parameters() if "lora_" in n)


def test_a_checkpoint_of_another_format_is_refused(tiny_family, tmp_path):
    import json

    from lib.artifacts import ArtifactError
    from lib.training_state import Checkpoints

    config = TrainConfig(kind="control", steps=2, learning_rate=1e-2, batch_size=2, lora_r=2, lora_alpha=2)
    checkpoints = Checkpoints(tmp_path / "run", every=1)
    training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config, checkpoints=checkpoints)
    sidecar = checkpoints.path(2).with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ArtifactError, match="another format"):
        training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config, checkpoints=checkpoints)
