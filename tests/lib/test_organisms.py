"""lib.organisms: the chapter's summaries of the shipped adapters and the robustness check's sites and radii."""

import pytest

from lib import organisms

FAMILY = "smollm2-135m"


def test_each_adversary_is_attacked_at_its_own_site_and_the_baselines_at_both():
    assert organisms.sites_attacked(FAMILY, "at") == {"embeddings (layer 0)": 0}
    assert organisms.sites_attacked(FAMILY, "lat") == {"layer 4 (LAT site)": 4}
    assert organisms.sites_attacked(FAMILY, "ssft") == organisms.sites_attacked(FAMILY, "ssft-control") \
        == organisms.attack_sites(FAMILY)


def test_the_attack_uses_the_radius_each_adversary_trained_with():
    table = organisms.adapter_table(FAMILY, ["at", "lat"])
    assert organisms.chosen_radius(FAMILY, 0) == table.loc["at", "epsilon"]
    assert organisms.chosen_radius(FAMILY, 4) == table.loc["lat", "epsilon"]
    assert set(organisms.loss_frame(FAMILY, ["at"])["variant"]) == {"at"}


def test_the_recipe_file_is_what_trained_the_shipped_adapters():
    """One source per setting: lib/recipes.yaml's stages are the settings in the shipped adapters' training logs."""
    from lib import training

    stages = training.recipe(FAMILY)
    for variant, stage in (("ssft", "ssft"), ("ssft-control", "adversarial"), ("at", "adversarial"),
                           ("lat", "adversarial")):
        config = organisms.training_log(FAMILY, variant)["config"]
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in stages[stage].items() if k not in ("why", "kind")}
        assert {k: config[k] for k in settings} == settings, variant
    with pytest.raises(ValueError, match=r"No training recipe for family 'nope' in recipes.yaml.*smollm2-135m"):
        training.recipe("nope")


def test_the_adapters_readme_is_what_the_logs_say():
    """data/adapters/<family>/README.md lists each shipped adapter's recipe, dose, seed and checksum, and cannot
    drift from the adapters: regenerate it with `python -m lib.organisms --readme`."""
    variants = ["ssft", "ssft-control", "at", "lat"]
    expected = organisms.adapters_readme(FAMILY, variants)
    assert organisms.readme_path(FAMILY).read_text(encoding="utf-8") == expected
    for variant in variants:
        assert f"| `{variant}` |" in expected
        assert organisms.sha256_file(organisms.ADAPTERS_ROOT / FAMILY / variant / "adapter_model.safetensors") in expected
