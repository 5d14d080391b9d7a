"""lib.claims: every verdict rule fed synthetic measurements whose verdict is known."""

import pandas as pd
import pytest

from lib import claims

REFUSE, COMPLY = "refusal", "valid"


def test_claim1_is_supported_only_when_every_model_refuses_less_under_its_own_direction():
    drop = {("none", "a"): [REFUSE] * 40, ("a", "a"): [COMPLY] * 40,
            ("none", "b"): [REFUSE] * 40, ("b", "b"): [REFUSE] * 38 + [COMPLY] * 2}
    table, stored = claims.claim1(drop, ["a", "b"], 40, n_boot=300)
    assert table["verdict"].tolist() == ["refusal drops", "not resolved"] and stored["verdict"] == "not supported"
    drop[("b", "b")] = [COMPLY] * 40
    table, stored = claims.claim1(drop, ["a", "b"], 40, n_boot=300)
    assert stored["verdict"] == "supported" and stored["n_test"] == 40 and len(stored["drops"]) == 2
    assert table.loc[0, "difference"] == 100


def _pairwise(low_high):
    return pd.DataFrame([{"variant": "lat", "versus": v, "k": "top-2", "difference": (lo + hi) / 2, "low": lo,
                          "high": hi} for v, (lo, hi) in low_high.items()])


def test_claim2_needs_lat_higher_than_every_other_variant():
    single = pd.DataFrame([{"variant": v, "share": s, "low": s - 0.05, "high": s + 0.05}
                           for v, s in (("ssft", 0.5), ("at", 0.5), ("lat", 0.7))])
    above = _pairwise({"ssft": (0.1, 0.3), "at": (0.05, 0.2)})
    mixed = _pairwise({"ssft": (0.1, 0.3), "at": (-0.1, 0.2)})
    assert claims.claim2_rows(mixed)["verdict"].tolist() == ["higher", "not resolved"]
    stored = claims.claim2(above, mixed, single, 13, 100)
    assert stored["verdict"] == "supported" and stored["centred_verdict"] == "not supported"
    assert stored["statement"] == ("LAT's top-2 share at layer 13 is higher than that of ssft, at beyond the 95% "
                                   "interval (uncentred, 100 pairs; LAT minus ssft +0.200 [+0.100, +0.300], "
                                   "at +0.125 [+0.050, +0.200])")
    assert stored["shares"]["lat"] == [0.7, 0.65, 0.75]
    assert claims.claim2(mixed, above, single, 13, 100)["verdict"] == "not supported"


def test_claim2_says_how_much_of_the_top2_excess_is_the_first_component():
    single = pd.DataFrame([{"variant": v, "share": s, "low": s - 0.05, "high": s + 0.05}
                           for v, s in (("ssft", 0.5), ("at", 0.5), ("lat", 0.7))])
    top2 = _pairwise({"ssft": (0.1, 0.3), "at": (0.05, 0.2)})
    top1 = _pairwise({"ssft": (0.1, 0.3), "at": (0.0, 0.1)}).assign(k="top-1")
    statement = claims.claim2(top2, top2, single, 13, 100, top1_pairwise=top1)["statement"]
    assert statement.endswith("Its top-1 share alone differs by ssft +0.200 [+0.100, +0.300], at +0.050 [+0.000, "
                              "+0.100], which leaves the second component's own share differing by ssft +0.000, "
                              "at +0.075 (top-2 minus top-1 difference, point estimates)")


def synthetic_matrix(lat_foreign, lat_self, other_self, other_foreign, lat_to_others, n=40):
    def labels(rate):
        return [REFUSE] * round(rate * n) + [COMPLY] * (n - round(rate * n))

    models = ("lat", "ssft", "at")
    matrix = {}
    for s in models:
        for t in models:
            if s == t:
                rate = lat_self if t == "lat" else other_self
            elif t == "lat":
                rate = lat_foreign
            elif s == "lat":
                rate = lat_to_others
            else:
                rate = other_foreign
            matrix[(s, t)] = labels(rate)
    return matrix


def test_transfer_contrasts_support_and_contradict():
    paper_like = claims.transfer_contrasts(synthetic_matrix(0.9, 0.1, 0.5, 0.7, 0.2), n_boot=300)
    assert [row["verdict"] for row in paper_like] == ["supported"] * 3
    opposite = claims.transfer_contrasts(synthetic_matrix(0.2, 0.9, 0.4, 0.6, 0.9), n_boot=300)
    assert [row["verdict"] for row in opposite] == ["contradicted"] * 3
    with pytest.raises(ValueError, match="lacks the conditions"):
        claims.transfer_contrasts({("lat", "lat"): [REFUSE]})


def test_robustness_compares_each_trained_variant_with_each_reference_at_its_own_site():
    attack = {("at", "embed"): [REFUSE] * 30, ("lat", "layer 4"): [COMPLY] * 30,
              ("ssft", "embed"): [COMPLY] * 30, ("ssft", "layer 4"): [COMPLY] * 30,
              ("ssft-control", "embed"): [COMPLY] * 30, ("ssft-control", "layer 4"): [REFUSE] * 30}
    table = claims.robustness(attack, ["embed", "layer 4"], seed=1)
    assert table["verdict"].tolist() == ["more robust", "more robust", "not resolved", "less robust"]
    stored = claims.organisms(table, pd.DataFrame([{"variant": "at", "all met": True}]))
    assert len(stored["robustness"]) == 4 and stored["acceptance"] == [{"variant": "at", "all met": True}]


def test_the_robustness_statement_says_whether_adversarial_training_gave_robustness():
    attacked = {("at", "layer 0"): [COMPLY] * 30 + [REFUSE] * 10, ("lat", "layer 4"): [REFUSE] * 40,
                ("ssft", "layer 0"): [REFUSE] * 30 + [COMPLY] * 10, ("ssft", "layer 4"): [COMPLY] * 20 + [REFUSE] * 20}
    robust = claims.robustness(attacked, ["layer 0", "layer 4"], ("at", "lat"), ("ssft",), seed=0)
    statement = claims.robustness_statement(robust)
    assert statement.startswith("AT under the attack at layer 0: less robust than ssft (-50.0 points [")
    assert "LAT under the attack at layer 4: more robust than ssft (+50.0 points [" in statement
    assert statement.endswith("So LAT came out more robust than every reference model.")
    robust["verdict"] = "not resolved"
    assert "AT under the attack at layer 0: not resolved against ssft (-50.0 points [" in claims.robustness_statement(robust)
    assert claims.robustness_statement(robust).endswith(
        "So no adversarially trained variant came out more robust than every reference model.")
    assert claims.organisms(robust, pd.DataFrame())["statement"] == claims.robustness_statement(robust)
