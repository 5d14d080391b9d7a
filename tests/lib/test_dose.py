"""lib.dose: a training checkpoint becomes a model variant that computes what the trained model computes."""

import pytest
import torch

from lib import dose, inputs, models, training
from lib.training import TrainConfig
from lib.training_state import Checkpoints
from tests.lib.test_training import EXAMPLES


def test_a_checkpoint_loads_as_the_model_it_saved(tiny_family, tmp_path):
    config = TrainConfig(kind="control", steps=3, learning_rate=5e-2, batch_size=2, lora_r=2, lora_alpha=4,
                         target_modules=("q_proj", "v_proj", "down_proj"))
    checkpoints = Checkpoints(tmp_path / "run", every=2)
    lm = models.load("tiny-llama", "base", device="cpu")
    trained, _ = training.train_lora(lm, EXAMPLES, config, checkpoints=checkpoints, stop_at=2)
    batch = inputs.encode(lm, ["how do i bake bread", "tell me a joke"])
    with torch.no_grad():
        expected = trained(**batch).logits
    name = dose.checkpoint_variant("tiny-llama", "control@2", checkpoints, 2, base="base")
    loaded = models.load("tiny-llama", name, device="cpu")
    with torch.no_grad():
        found = loaded.model(**batch).logits
    base = models.load("tiny-llama", "base", device="cpu")
    with torch.no_grad():
        untrained = base.model(**batch).logits
    assert torch.allclose(found, expected, atol=1e-5)  # the merged checkpoint computes what the trained model did
    assert not torch.allclose(found, untrained, atol=1e-3)  # and the adapter changed something
    assert loaded.info.fingerprint != base.info.fingerprint
    assert dose.checkpoint_variant("tiny-llama", "control@2", checkpoints, 2, base="base") == name  # once
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 3"):
        dose.checkpoint_adapter(checkpoints, 3, "tiny-llama/base")


def test_checkpoint_tables_compare_each_step_with_ssft_and_the_control_of_that_step():
    from lib import claims

    sites = {"embeddings (layer 0)": 0, "layer 4 (LAT site)": 4}

    def model(refused_under_attack, harmless_refused=0):
        attacked = {site: ["refusal"] * refused_under_attack + ["valid"] * (8 - refused_under_attack) for site in sites}
        return {"under attack": attacked, "labels": {"harmful": ["refusal"] * 8,
                                                     "harmless": ["refusal"] * harmless_refused + ["valid"] * (8 - harmless_refused)}}

    measurements = {"ssft@0": model(2), "ssft-control@70": model(2), "at@70": model(3), "lat@70": model(2),
                    "ssft-control@140": model(2), "at@140": model(8), "lat@140": model(8, harmless_refused=1),
                    "at@210": model(8)}  # step 210: LAT and the control not measured yet
    tables = dose.checkpoint_tables("smollm2-135m", measurements)
    assert sorted(tables) == [70, 140]
    robust, accepted = tables[140]
    assert set(robust["verdict"]) == {"more robust"} and set(robust["versus"]) == {"ssft", "ssft-control"}
    assert list(robust["attack site"]) == ["embeddings (layer 0)"] * 2 + ["layer 4 (LAT site)"] * 2
    assert not accepted.set_index("variant").loc["lat", "all met"]  # 1 of 8 harmless refused: 12.5% > 10%
    assert set(tables[70][0]["verdict"]) == {"not resolved"}
    assert claims.chosen_dose(tables)["rule"] == "no checkpoint robust and accepted: the last accepted"


def test_curves_name_each_variants_own_site_and_measure_cosines_against_ssft():
    ssft_site, lat_site = "embeddings (layer 0)", "layer 4 (LAT site)"

    def result(refused):
        labels = ["refusal"] * refused + ["valid"] * (4 - refused)
        return {"under attack": {ssft_site: labels, lat_site: labels[::-1]},
                "labels": {"harmful": labels, "harmless": ["valid"] * 4, "everyday": ["valid"] * 4},
                "top-2 share": 0.3, "second component share": 0.05}

    measurements = {"ssft@0": result(2), "lat@70": result(4)}
    directions = {"ssft@0": torch.tensor([1.0, 0.0]), "lat@70": torch.tensor([0.6, 0.8])}
    frame = dose.curves("smollm2-135m", measurements, directions).set_index(["variant", "step", "measure"])
    assert frame.loc[("lat", 70, "refusal under attack, own site (%)"), "value"] == 100.0
    assert frame.loc[("lat", 70, "refusal under attack, other site (%)"), "value"] == 100.0
    assert frame.loc[("ssft", 0, f"refusal under attack, {lat_site} (%)"), "value"] == 50.0
    assert frame.loc[("lat", 70, "cosine with SSFT's direction"), "value"] == pytest.approx(0.6)
    assert frame.loc[("ssft", 0, "refusal of everyday prompts (%)"), "high"] > 0  # a Wilson interval, not 0 to 0


def test_a_shipped_checkpoint_is_an_adapter_folder_with_its_step_and_manifest(tiny_family, tmp_path):
    import json

    from lib.artifacts import sha256_file

    config = TrainConfig(kind="control", steps=4, learning_rate=5e-2, batch_size=2, lora_r=2, lora_alpha=4)
    checkpoints = Checkpoints(tmp_path / "run", every=2)
    training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config, checkpoints=checkpoints)
    folder = dose.ship_checkpoint(checkpoints, 2, "tiny-llama/base", tmp_path / "shipped" / "control",
                                  {"chosen_by": "a test"})
    log = json.loads((folder / "training_log.json").read_text())
    assert log["shipped_step"] == 2 and log["chosen_by"] == "a test" and len(log["steps"]) == 2
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(manifest) == {"adapter_config.json", "adapter_model.safetensors", "training_log.json"}
    assert all(manifest[name] == sha256_file(folder / name) for name in manifest)
    assert not (tmp_path / "shipped" / "control.partial").exists()
    models.register_families({"tiny-shipped": {"base": {"local": str(tiny_family / "base")},
                                               "variants": {"control": {"adapters": [{"path": str(folder)}]}}}})
    assert models.load("tiny-shipped", "control", device="cpu").info.n_layers == 4  # the manifest verifies


def test_ship_chosen_ships_the_step_the_rule_picks(tiny_family, tmp_path):
    import json

    config = TrainConfig(kind="control", steps=4, learning_rate=5e-2, batch_size=2, lora_r=2, lora_alpha=4)
    checkpoints = Checkpoints(tmp_path / "run", every=2)
    training.train_lora(models.load("tiny-llama", "base", device="cpu"), EXAMPLES, config, checkpoints=checkpoints)
    sites = ("embeddings (layer 0)", "layer 1 (LAT site)")  # the tiny family's adversary layer is 1

    def model(refused):
        return {"under attack": {site: ["refusal"] * refused + ["valid"] * (8 - refused) for site in sites},
                "labels": {"harmful": ["refusal"] * 8, "harmless": ["valid"] * 8}}

    measurements = {"ssft@0": model(1), **{f"{v}@2": model(1) for v in ("ssft-control", "at", "lat")},
                    "ssft-control@4": model(1), "at@4": model(8), "lat@4": model(8)}
    every = {v: checkpoints for v in ("ssft-control", "at", "lat")}
    with pytest.raises(ValueError, match=r"Steps \[6\] of the run are not measured"):
        dose.ship_chosen("tiny-llama", measurements, every, tmp_path / "adapters", [2, 4, 6])
    with pytest.raises(ValueError, match="together"):
        dose.ship_chosen("tiny-llama", measurements, {"at": checkpoints}, tmp_path / "adapters", [2, 4])
    decision = dose.ship_chosen("tiny-llama", measurements, every, tmp_path / "adapters", [2, 4])
    assert decision == {"step": 4, "rule": "first checkpoint robust and accepted", "robust": [4]}
    for variant in ("ssft-control", "at", "lat"):
        log = json.loads((tmp_path / "adapters" / variant / "training_log.json").read_text())
        assert log["shipped_step"] == 4 and log["chosen_by"]["rule"] == decision["rule"]
