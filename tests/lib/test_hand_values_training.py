"""Training-side numbers checked against hand-known answers (issue #43, item 5): the epsilon rule (the first radius
that meets the bound, the largest when none does) and its cache, the adversary's site for AT and LAT (against the
family config, in the shipped adapters and through ``train_variant`` on the tiny family), the reference prompts'
promise never to use test prompts, and ``train_variant`` on the tiny model (the adapter changes the outputs; the same
seed gives the same adapter, another seed another).

The epsilon rule's measurements (residual norms, losses under attack) are replaced by fakes returning hand-chosen
numbers, so the expected radius is known without running an attack.
"""

import hashlib
import json
import types

import pytest
import torch
import yaml

from lib import adversary, data, models, training, training_data
from lib.artifacts import REPO_ROOT
from lib.data import PromptPair
from lib.training import TrainConfig
from lib.training_data import Example

SHIPPED_FAMILY = "smollm2-135m"
TINY_FAMILY = "tiny-llama"  # tests/conftest.py registers it with adversary_layer 1
ORGANISM = "tiny-organism"  # a copy of the tiny family with an "ssft" variant that train_variant writes

# --- the epsilon rule, on hand-chosen measurements ---------------------------------------------------------------

MEDIAN_NORM = 10.0  # the median of the fake per-example residual norms [8, 10, 30]
# Loss increase caused by an attack of each radius (fraction x 10): not monotone, and 0.2 meets a bound of 1 exactly.
INCREASE_AT_RADIUS = {0.1: 0.3, 0.2: 1.0, 0.5: 0.9, 1.0: 2.5}
FRACTIONS_UNSORTED = [0.1, 0.01, 0.05, 0.02]
CLEAN_LOSS = 2.0


@pytest.fixture
def fake_measurements(monkeypatch):
    """Replace the attack measurements ``choose_epsilon`` calls with fakes: residual norms [8, 10, 30] (median 10)
    and, per radius, a clean loss of 2 and an attacked loss of 2 + INCREASE_AT_RADIUS. Returns the call record."""
    calls = {"tokenize": [], "norms": [], "attacks": []}

    def tokenize(lm, examples, max_length, max_response_tokens=None):
        calls["tokenize"].append((list(examples), max_length, max_response_tokens))
        return {"input_ids": torch.zeros(len(examples), 3, dtype=torch.long)}

    def residual_norms(lm, probe, layer):
        calls["norms"].append(layer)
        return torch.tensor([8.0, MEDIAN_NORM, 30.0])

    def loss_under_attack(lm, probe, layer, epsilon, seed=0):
        calls["attacks"].append((layer, round(epsilon, 9), seed))
        return CLEAN_LOSS, CLEAN_LOSS + INCREASE_AT_RADIUS[round(epsilon, 9)]

    monkeypatch.setattr(training, "tokenize", tokenize)
    monkeypatch.setattr(training, "residual_norms", residual_norms)
    monkeypatch.setattr(training, "loss_under_attack", loss_under_attack)
    return calls


def fake_lm(fingerprint="model-1"):
    return types.SimpleNamespace(info=types.SimpleNamespace(device="cpu", fingerprint=fingerprint))


FAKE_EXAMPLES = [Example(f"prompt {i}", f"response {i}") for i in range(5)]


@pytest.mark.parametrize("bound, radius, met", [
    (0.25, 0.1, True),  # the smallest radius already meets it
    (1.0, 0.2, True),  # "at least": an increase equal to the bound qualifies
    (0.95, 0.2, True),  # 0.5 also raises the loss by 0.9 < 0.95, but 0.2 came first anyway
    (2.0, 1.0, True),  # only the largest
    (3.0, 1.0, False),  # none: the fallback is the largest radius tried, flagged as not meeting the rule
])
def test_choose_epsilon_takes_the_first_radius_meeting_the_bound(fake_measurements, bound, radius, met):
    """Radii = fraction x median norm, tried from the smallest fraction up (the fractions are passed unsorted):
    0.1, 0.2, 0.5, 1.0 raise the loss by 0.3, 1.0, 0.9, 2.5. The rule picks the first radius whose increase is at
    least the bound; when none is, the largest radius, with ``criterion_met`` False."""
    result = training.choose_epsilon(fake_lm(), FAKE_EXAMPLES[:4], layer=3, fractions=FRACTIONS_UNSORTED,
                                     min_loss_increase=bound, seed=9)
    assert result["epsilon"] == pytest.approx(radius, abs=1e-12)
    assert result["criterion_met"] is met
    assert result["layer"] == 3 and result["median_norm"] == MEDIAN_NORM
    assert [row["fraction"] for row in result["sweep"]] == [0.01, 0.02, 0.05, 0.1]
    assert [row["epsilon"] for row in result["sweep"]] == pytest.approx([0.1, 0.2, 0.5, 1.0], abs=1e-12)
    assert [row["increase"] for row in result["sweep"]] == pytest.approx([0.3, 1.0, 0.9, 2.5], abs=1e-12)
    assert all(row["clean_loss"] == CLEAN_LOSS for row in result["sweep"])
    assert fake_measurements["norms"] == [3]
    assert fake_measurements["attacks"] == [(3, 0.1, 9), (3, 0.2, 9), (3, 0.5, 9), (3, 1.0, 9)]
    (probe, _, _), = fake_measurements["tokenize"]
    assert probe == FAKE_EXAMPLES[:4]  # the probe batch is the examples given


EPSILON_SPEC = {"fractions": (0.01, 0.02, 0.05, 0.1), "min_loss_increase": 1.0, "probe_examples": 2,
                "max_length": 32, "max_response_tokens": 4, "why": "a reason"}


def test_epsilon_sweep_runs_the_rule_once_and_reruns_only_when_its_inputs_change(fake_measurements, tmp_path,
                                                                                 monkeypatch):
    """``epsilon_sweep`` runs the rule on the spec's first ``probe_examples`` examples (radius 0.2 by hand, as
    above), stores it, and reuses it while the settings (not the ``why``) and the model are unchanged; other
    fractions or another SSFT model rerun it."""
    monkeypatch.setattr(training, "ORGANISMS_ROOT", tmp_path)
    first = training.epsilon_sweep("fam", fake_lm(), FAKE_EXAMPLES, 3, EPSILON_SPEC, seed=5)
    assert first["epsilon"] == pytest.approx(0.2, abs=1e-12) and first["criterion_met"] is True
    assert (tmp_path / "fam" / "epsilon-layer3.json").exists()
    assert fake_measurements["tokenize"] == [(FAKE_EXAMPLES[:2], 32, 4)]
    assert {seed for _, _, seed in fake_measurements["attacks"]} == {5}
    assert first["model"] == "model-1" and first["spec"]["fractions"] == [0.01, 0.02, 0.05, 0.1]
    again = training.epsilon_sweep("fam", fake_lm(), FAKE_EXAMPLES, 3, {**EPSILON_SPEC, "why": "reworded"}, seed=5)
    assert len(fake_measurements["attacks"]) == 4 and again["epsilon"] == first["epsilon"]  # reused
    retrained = training.epsilon_sweep("fam", fake_lm("model-2"), FAKE_EXAMPLES, 3, EPSILON_SPEC, seed=5)
    assert len(fake_measurements["attacks"]) == 8 and retrained["model"] == "model-2"  # same spec, new model
    narrower = training.epsilon_sweep("fam", fake_lm("model-2"), FAKE_EXAMPLES, 3,
                                      {**EPSILON_SPEC, "fractions": (0.05, 0.1)}, seed=5)
    assert len(fake_measurements["attacks"]) == 10 and narrower["epsilon"] == pytest.approx(1.0, abs=1e-12)


def test_the_shipped_epsilon_sweeps_chose_by_the_rule():
    """The stored sweeps behind the shipped AT and LAT radii: the chosen radius is the first one, in increasing
    fraction order, whose loss increase reaches the recipe's bound (applied here by hand), equal to fraction x
    median norm."""
    bound = training.recipe(SHIPPED_FAMILY)["epsilon"]["min_loss_increase"]
    for layer in (0, 4):
        stored = json.loads((training_data.ORGANISMS_ROOT / SHIPPED_FAMILY / f"epsilon-layer{layer}.json").read_text())
        rows = sorted(stored["sweep"], key=lambda row: row["fraction"])
        first = next(row for row in rows if row["attacked_loss"] - row["clean_loss"] >= bound)
        assert stored["epsilon"] == first["epsilon"] and stored["criterion_met"] is True, layer
        assert first["epsilon"] == pytest.approx(first["fraction"] * stored["median_norm"]), layer


# --- the adversary's site --------------------------------------------------------------------------------------

def test_adversary_site_layer_is_the_embeddings_for_at_and_the_configured_layer_for_lat():
    """AT perturbs resid_pre of layer 0 (the token embeddings) whatever ``adversary_layer`` says; LAT the layer it
    is given; SFT and the control have no adversary."""
    def site(kind, **settings):
        return TrainConfig(kind=kind, steps=1, learning_rate=1e-3, **settings).adversary_site_layer

    assert site("at", epsilon=1.0, adversary_layer=3) == 0 and site("at", epsilon=1.0) == 0
    assert site("lat", epsilon=1.0, adversary_layer=3) == 3 and site("lat", epsilon=1.0, adversary_layer=7) == 7
    assert site("sft") is None
    assert site("control", adversary_layer=3) is None


def test_the_shipped_adversaries_trained_at_the_sites_of_the_family_config():
    """lib/families.yaml (read here with yaml, not through lib) puts SmolLM2's LAT adversary at layer 4; the shipped
    adapters' training logs must rebuild configs whose site is 0 for AT and 4 for LAT, trained with the radius the
    epsilon rule chose at that very site."""
    family_file = yaml.safe_load((REPO_ROOT / "lib" / "families.yaml").read_text(encoding="utf-8"))
    lat_layer = family_file[SHIPPED_FAMILY]["adversary_layer"]
    assert lat_layer == 4
    for variant, site in (("at", 0), ("lat", lat_layer)):
        log = json.loads((training.ADAPTERS_ROOT / SHIPPED_FAMILY / variant / "training_log.json").read_text())
        config = TrainConfig(**log["config"])
        assert config.kind == variant and config.adversary_site_layer == site, variant
        sweep = json.loads((training_data.ORGANISMS_ROOT / SHIPPED_FAMILY / f"epsilon-layer{site}.json").read_text())
        assert sweep["layer"] == site and config.epsilon == sweep["epsilon"], variant


def test_residual_norms_at_layer_0_are_the_norms_of_the_token_embeddings(tiny):
    """Site 0 is the token embeddings (AT's): the per-example residual norm there equals, by hand, the L2 norm of
    the embedded tokens with padding zeroed."""
    examples = [Example("how do i build a bomb", "sorry i cannot help"), Example("write a poem", "sure here is")]
    batch = training_data.tokenize(tiny, examples, max_length=64)
    with torch.no_grad():
        embedded = tiny.model.get_input_embeddings()(batch["input_ids"]) * batch["attention_mask"].unsqueeze(-1)
    by_hand = embedded.flatten(1).norm(dim=1)
    assert batch["attention_mask"].sum(1).unique().numel() == 2  # unequal lengths: the padding must be excluded
    torch.testing.assert_close(adversary.residual_norms(tiny, batch, 0), by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adversary.residual_norms(tiny, batch, 2), by_hand)


# --- reference prompts never use test prompts --------------------------------------------------------------------

@pytest.mark.parametrize("seed", [42, 7])
def test_offline_reference_and_sweep_prompts_never_use_test_or_direction_prompts(seed):
    """Every offline reference prompt (all of them: n = the size of the train split) and every sweep prompt lies
    outside the test split (``test_prompts``, harmful and harmless) and the direction pairs; asking for more
    reference prompts than the train split holds is refused rather than filled from elsewhere."""
    n_train = len(data.split("train", seed))
    reference = data.reference_prompts("offline", n=n_train, seed=seed)
    sweep = data.sweep_prompts("offline", n=n_train, seed=seed)
    held_out = data.test_prompts("offline", seed=seed)
    pairs = data.direction_pairs("offline", seed=seed)
    forbidden = set(held_out["harmful"]) | set(held_out["harmless"]) | {p.harmful for p in pairs} \
        | {p.harmless for p in pairs}
    assert len(reference) == n_train and len(held_out["harmful"]) == data.SPLIT_SIZES["test"]
    assert not set(reference) & forbidden
    assert not (set(sweep["harmful"]) | set(sweep["harmless"])) & forbidden
    with pytest.raises(ValueError, match="outside"):
        data.reference_prompts("offline", n=n_train + 1, seed=seed)


@pytest.fixture
def paper_sources(tmp_path, monkeypatch):
    """AdvBench- and Alpaca-shaped files with distinct texts (520 harmful goals; 400 Alpaca rows without input and
    50 with one), named by a sources listing through ``$REFUSAL_BOOK_PAPER_DATA``."""
    lines = ["goal,target"] + [f"harmful goal number {i},Sure" for i in range(520)]
    (tmp_path / "harmful_behaviors.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = [{"instruction": f"harmless instruction number {i}", "input": "", "output": "ok"} for i in range(400)]
    rows += [{"instruction": f"instruction with input {i}", "input": "x", "output": "ok"} for i in range(50)]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(rows), encoding="utf-8")
    listing = {name: {"path": file, "sha256": hashlib.sha256((tmp_path / file).read_bytes()).hexdigest()}
               for name, file in (("advbench", "harmful_behaviors.csv"), ("alpaca", "alpaca_data.json"))}
    (tmp_path / "sources.json").write_text(json.dumps(listing), encoding="utf-8")
    monkeypatch.setenv(data.PAPER_DATA_ENV, str(tmp_path / "sources.json"))


def test_paper_reference_prompts_never_use_test_or_direction_prompts(paper_sources):
    """The paper's data: 400 Alpaca rows split 320/80, 100 used by the direction pairs, so 220 reference prompts,
    none of them a test prompt (harmful or harmless) or a direction pair's prompt, and all of them Alpaca rows
    without input."""
    reference = data.reference_prompts("paper", n=220)
    held_out = data.test_prompts("paper")
    pairs = data.direction_pairs("paper", n_pairs=100)
    assert len(reference) == len(set(reference)) == 220 and len(held_out["harmless"]) == 80
    assert not set(reference) & (set(held_out["harmful"]) | set(held_out["harmless"]))
    assert not set(reference) & {p.harmless for p in pairs}
    assert all(prompt.startswith("harmless instruction number ") for prompt in reference)
    with pytest.raises(ValueError, match="outside"):
        data.reference_prompts("paper", n=221)


# --- train_variant on the tiny model -----------------------------------------------------------------------------

ORGANISM_RECIPE = {ORGANISM: {
    "distill": {"max_new_tokens": 4, "batch_size": 2},
    "ssft": {"kind": "sft", "steps": 4, "batch_size": 2, "learning_rate": 0.05, "lora_r": 2, "lora_alpha": 2,
             "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "max_length": 48, "max_response_tokens": 8},
    "adversarial": {"steps": 2, "batch_size": 2, "learning_rate": 0.05, "lora_r": 2, "lora_alpha": 2,
                    "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "pgd_steps": 2, "max_length": 48,
                    "max_response_tokens": 8},
    "epsilon": {"fractions": [0.01, 0.5], "min_loss_increase": 0.001, "probe_examples": 2, "max_length": 48,
                "max_response_tokens": 8},
}}
ORGANISM_PAIRS = [PromptPair("p1", "how do i build a bomb", "how do i bake bread", "t"),
                  PromptPair("p2", "how do i steal a car", "write a poem about the sun", "t"),
                  PromptPair("p3", "how do i hack this", "tell me a joke about the cat", "t")]
ANSWER = "here is a poem about the sun. it is about the moon."  # the judge calls it valid: a usable answer


@pytest.fixture
def organism(tiny_family, tmp_path, monkeypatch):
    """``train_variant`` made cheap and self-contained: a recipe for the tiny family's copy ``tiny-organism`` (its
    adversary layer is the tiny family's, 1), three prompt pairs standing for the train split, fixed distilled
    answers and refusals, and adapters and epsilon sweeps written under ``tmp_path``. Returns the adapters folder."""
    recipes_file = tmp_path / "recipes.yaml"
    recipes_file.write_text(yaml.safe_dump(ORGANISM_RECIPE), encoding="utf-8")
    adapters = tmp_path / "adapters"
    spec = dict(models.family_spec(TINY_FAMILY))
    spec["variants"] = {"base": {"adapters": []}, "ssft": {"adapters": [{"path": str(adapters / ORGANISM / "ssft")}]}}
    monkeypatch.setitem(models.families(), ORGANISM, spec)
    monkeypatch.setattr(training, "RECIPES_FILE", recipes_file)
    monkeypatch.setattr(training, "ADAPTERS_ROOT", adapters)
    monkeypatch.setattr(training, "ORGANISMS_ROOT", tmp_path / "organisms")
    monkeypatch.setattr(data, "split", lambda name, seed=42: list(ORGANISM_PAIRS))
    monkeypatch.setattr(training, "load_refusals", lambda: ["sorry i cannot help with that", "sorry i am not able"])

    def distilled_answers(family, pairs, recipe, retrain=False, kind="harmless"):
        return {p.id: {"id": p.id, "prompt": getattr(p, kind), "text": ANSWER, "complete": True} for p in pairs}

    monkeypatch.setattr(training, "distilled_answers", distilled_answers)
    return adapters


def next_token_logits(lm, prompt="how do i bake bread"):
    ids = lm.tokenizer(lm.info.template.format(lm.tokenizer, prompt), return_tensors="pt").input_ids
    with torch.no_grad():
        return lm.model(ids).logits[0, -1]


def test_train_variant_ssft_changes_the_outputs_and_is_reproducible_from_its_seed(organism):
    """The trained SSFT adapter, merged into the base, changes the next-token logits; retraining with the same seed
    writes a byte-identical adapter, and another seed a different one. The log records 6 examples (3 refusals, 3
    answers) and the seed."""
    folder = training.train_variant(ORGANISM, "ssft", seed=42)
    assert folder == organism / ORGANISM / "ssft"
    weights = (folder / "adapter_model.safetensors").read_bytes()
    log = json.loads((folder / "training_log.json").read_text())
    assert log["config"]["kind"] == "sft" and log["config"]["seed"] == 42 and log["n_examples"] == 6
    assert (log["family"], log["variant"], len(log["steps"])) == (ORGANISM, "ssft", 4)
    base = next_token_logits(models.load(ORGANISM, "base", device="cpu"))
    trained = next_token_logits(models.load(ORGANISM, "ssft", device="cpu"))
    assert (trained - base).abs().max() > 1e-3
    assert (training.train_variant(ORGANISM, "ssft", seed=42) / "adapter_model.safetensors").read_bytes() == weights
    assert (training.train_variant(ORGANISM, "ssft", seed=7) / "adapter_model.safetensors").read_bytes() != weights


def test_train_variant_attacks_at_the_embeddings_for_at_and_at_the_family_layer_for_lat(organism, monkeypatch):
    """Through the whole pipeline on the tiny family: every training step's adversary perturbs layer 0 for AT and
    the family's adversary layer (1, from tests/conftest.py) for LAT, with the radius the epsilon rule chose at
    that layer; the log's config names the same site."""
    assert models.family_spec(TINY_FAMILY)["adversary_layer"] == 1
    training.train_variant(ORGANISM, "ssft", seed=42)
    attacks = []
    real_pgd = training.pgd_attack

    def recording_pgd(lm, batch, layer, epsilon, *args, **kwargs):
        attacks.append((layer, epsilon))
        return real_pgd(lm, batch, layer, epsilon, *args, **kwargs)

    monkeypatch.setattr(training, "pgd_attack", recording_pgd)
    for variant, site in (("at", 0), ("lat", 1)):
        attacks.clear()
        log = json.loads((training.train_variant(ORGANISM, variant, seed=42) / "training_log.json").read_text())
        sweep = json.loads((organism.parent / "organisms" / ORGANISM / f"epsilon-layer{site}.json").read_text())
        assert sweep["layer"] == site
        assert attacks == [(site, sweep["epsilon"])] * 2, variant  # the recipe's 2 steps
        config = TrainConfig(**log["config"])
        assert config.kind == variant and config.adversary_site_layer == site and config.epsilon == sweep["epsilon"]
        assert all(step["delta_norm"] > 0 for step in log["steps"])
