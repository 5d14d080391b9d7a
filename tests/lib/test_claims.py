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


def _pairwise(low_high, k="component 2"):
    return pd.DataFrame([{"variant": "lat", "versus": v, "k": k, "difference": (lo + hi) / 2, "low": lo,
                          "high": hi} for v, (lo, hi) in low_high.items()])


def _measures(second, top1=None, top2=None):
    """A pairwise table with the second component's rows from ``second`` and top-1/top-2 rows (default: as it)."""
    return pd.concat([_pairwise(second), _pairwise(top1 or second, "top-1"), _pairwise(top2 or second, "top-2")],
                     ignore_index=True)


SINGLE = pd.DataFrame([{"variant": v, "k": "component 2", "share": s, "low": s - 0.05, "high": s + 0.05}
                       for v, s in (("ssft", 0.5), ("at", 0.5), ("lat", 0.7))])


def test_claim2_needs_the_second_component_higher_than_in_every_other_variant():
    above = _measures({"ssft": (0.1, 0.3), "at": (0.05, 0.2)})
    mixed = _measures({"ssft": (0.1, 0.3), "at": (-0.1, 0.2)})
    assert claims.claim2_rows(_pairwise({"ssft": (0.1, 0.3), "at": (-0.1, 0.2)}))["verdict"].tolist() == [
        "higher", "not resolved"]
    stored = claims.claim2(above, mixed, SINGLE, 13, 100)
    assert stored["verdict"] == "supported" and stored["centred_verdict"] == "not supported"
    assert stored["statement"].startswith(
        "LAT's second component's own share at layer 13 is higher than that of ssft, at beyond the 95% interval "
        "(uncentred, 100 pairs; LAT minus ssft +0.200 [+0.100, +0.300], at +0.125 [+0.050, +0.200]).")
    assert stored["shares"]["lat component 2"] == [0.7, 0.65, 0.75]
    assert claims.claim2(mixed, above, SINGLE, 13, 100)["verdict"] == "not supported"


def test_a_top2_excess_that_is_all_first_component_does_not_support_claim2():
    """The book's case: LAT's top-2 share is higher than every other variant's, but only because its first
    component is; the second component's own share does not differ. The claim is not supported, and the statement
    says that the top-2 share is higher."""
    excess = {"ssft": (0.02, 0.04), "at": (0.015, 0.025)}
    none = {"ssft": (-0.005, 0.007), "at": (-0.004, 0.006)}
    stored = claims.claim2(_measures(none, top1=excess, top2=excess), _measures(none), SINGLE, 13, 160)
    assert stored["verdict"] == "not supported"
    assert stored["beside"] == {"top-1": "higher", "top-2": "higher"}
    assert "Its top-2 share is higher than all of theirs (ssft +0.030 [+0.020, +0.040]" in stored["statement"]
    assert {(r["k"], r["versus"]): r["verdict"] for r in stored["differences"]}[("component 2", "at")] == (
        "not resolved")


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
    paper_like = claims.transfer_contrasts(synthetic_matrix(0.9, 0.1, 0.5, 0.7, 0.3, n=80), n_boot=300)
    assert [row["verdict"] for row in paper_like] == ["supported"] * 6
    assert set(claims.claim3_verdicts(paper_like).values()) == {"supported"}
    opposite = claims.transfer_contrasts(synthetic_matrix(0.2, 0.95, 0.4, 0.6, 0.8, n=80), n_boot=300)
    assert [row["verdict"] for row in opposite] == ["contradicted"] * 6
    with pytest.raises(ValueError, match="lacks the conditions"):
        claims.transfer_contrasts({("lat", "lat"): [REFUSE]})
    with pytest.raises(ValueError, match="two or more other"):
        claims.claim3_weights("lat", ["ssft"])


# The book's zero-ablation matrix (smollm2-135m, 64 test prompts): refusals under each (source, target).
BOOK_REFUSALS = {("ssft", "ssft"): 31, ("at", "ssft"): 4, ("lat", "ssft"): 3,
                 ("ssft", "at"): 23, ("at", "at"): 9, ("lat", "at"): 5,
                 ("ssft", "lat"): 28, ("at", "lat"): 5, ("lat", "lat"): 3}


def matrix_of(refusals, n=64):
    return {cell: [REFUSE] * k + [COMPLY] * (n - k) for cell, k in refusals.items()}


def pooled_robustness(labels):
    """The pooled form the book used before: LAT under the others' directions minus every other foreign cell."""
    def rate(cells):
        return 100 * sum(labels[c].count(REFUSE) for c in cells) / sum(len(labels[c]) for c in cells)
    return rate([("ssft", "lat"), ("at", "lat")]) - rate([("lat", "ssft"), ("at", "ssft"), ("lat", "at"),
                                                          ("ssft", "at")])


def test_a_lat_target_that_behaves_like_ssft_is_not_called_robust_or_vulnerable():
    """The book's matrix with the LAT target's column replaced by the SSFT target's: a LAT model that behaves
    exactly like SSFT, under directions as strong or weak as measured. Pooling the cells called it robust (+13.7
    points); compared like with like, against SSFT every difference is zero, and neither claim about the target
    is supported."""
    twin = {**BOOK_REFUSALS, **{(s, "lat"): BOOK_REFUSALS[(s, "ssft")] for s in ("ssft", "at", "lat")}}
    labels = matrix_of(twin)
    assert pooled_robustness(labels) == pytest.approx(13.67, abs=0.01)
    rows = claims.transfer_contrasts(labels, n_boot=500)
    against_ssft = [row for row in rows if row["versus"] == "target ssft"]
    assert len(against_ssft) == 2 and all(row["difference"] == 0 for row in against_ssft)
    verdicts = claims.claim3_verdicts(rows)
    assert verdicts["LAT robust to foreign directions"] != "supported"
    assert verdicts["LAT vulnerable to its own direction"] != "supported"


@pytest.mark.parametrize("size", [20, 30])
def test_a_planted_effect_of_a_stated_size_is_found(size):
    """Every cell at 50% refusal, then a LAT target that refuses ``size`` points more under every foreign direction
    and ``size`` points less under its own, and a LAT direction that leaves ``size`` points less in the other
    targets: each contrast measures its planted size, and every claim is supported against every model."""
    n, base = 200, 100
    refusals = {(s, t): base for s in ("lat", "ssft", "at") for t in ("lat", "ssft", "at")}
    planted = size * n // 100
    refusals.update({("ssft", "lat"): base + planted, ("at", "lat"): base + planted, ("lat", "lat"): base - planted,
                     ("lat", "ssft"): base - planted // 2, ("lat", "at"): base - planted // 2})
    rows = claims.transfer_contrasts(matrix_of(refusals, n), n_boot=500)
    by = {(row["claim"], row["versus"]): row["difference"] for row in rows}
    assert by[("LAT robust to foreign directions", "target ssft")] == pytest.approx(size)
    assert by[("LAT vulnerable to its own direction", "target at")] == pytest.approx(-size + size / 2)
    assert by[("LAT its direction transfers better", "direction at")] == pytest.approx(-size / 2)
    assert set(claims.claim3_verdicts(rows).values()) == {"supported"}


def _labels(refused, broken=0, n=24):
    return [REFUSE] * refused + ["broken"] * broken + [COMPLY] * (n - refused - broken)


def test_top_pc_removal_is_a_mark_of_lat_only_when_lat_falls_further_than_every_other_model():
    authors = claims.top_pc_removal({"ssft": _labels(24), "at": _labels(24), "lat": _labels(6)}, n_boot=500)
    assert authors["verdict"] == "specific"
    assert authors["statement"].startswith("With the top principal component removed, self-attack refusal left is "
                                           "SSFT 100.0%, AT 100.0%, LAT 25.0%; LAT minus SSFT -75.0")
    book = claims.top_pc_removal({"ssft": _labels(18), "at": _labels(5), "lat": _labels(3)}, n_boot=500)
    assert book["verdict"] == "not specific"
    assert [c["verdict"] for c in book["comparisons"]] == ["falls further", "not resolved"]
    assert book["statement"].endswith("So the fall is not specific to LAT in these organisms.")


def test_a_subspace_step_into_a_mostly_broken_model_is_not_read_as_refusal():
    labels = {("lat", "k=2"): _labels(2), ("lat", "k=3"): _labels(1, broken=16),
              ("ssft", "k=2"): _labels(17), ("ssft", "k=3"): _labels(2, broken=10)}
    steps = [("ssft", "k=2", "k=3"), ("lat", "k=2", "k=3")]
    frame, statement = claims.subspace_self_attacks(labels, steps, n_boot=300)
    assert frame["reading"].tolist() == ["refusal", "mostly broken: no reading"]
    assert frame["broken % (to)"].round(1).tolist() == [41.7, 66.7]
    assert frame["difference"].round(1).tolist() == [-62.5, -4.2]
    assert statement == ("LAT k=2 to k=3 leaves 66.7% broken (more than half): those steps read a broken model, "
                         "not refusal.")
    _, none = claims.subspace_self_attacks(labels, steps[:1], n_boot=300)
    assert none.startswith("No subspace self-attack leaves more than half")


def _stored(claim3_words, modes, claim1="supported", second=("not resolved", "not resolved"), robust="not resolved",
            top_pc=("falls further", "not resolved")):
    names = [f"LAT {name}" for name, _, _ in claims.CLAIM3]
    return [
        {"family": "f", "claim": "organisms", "robustness": [{"variant": v, "versus": r, "verdict": robust}
                                                             for v in ("at", "lat") for r in ("ssft", "ssft-control")]},
        {"family": "f", "claim": "claim1", "verdict": claim1},
        {"family": "f", "claim": "claim2", "layer": 13, "differences": [
            {"k": k, "versus": v, "verdict": w} for v, w in zip(("ssft", "at"), second)
            for k in ("component 2", "top-2")]},
        {"family": "f", "claim": "claim3", "verdicts": dict(zip(names, claim3_words))},
        {"family": "f", "claim": "ablation_modes", "verdicts": [
            {"claim": name, **dict(zip(claims.MODE_COLUMNS, words))}
            for name, words in zip([*names, claims.CLAIM1_MODES_ROW], modes)]},
        {"family": "f", "claim": "beyond", "comparisons": [{"versus": v, "verdict": w}
                                                          for v, w in zip(("ssft", "at"), top_pc)]}]


def test_the_replication_table_needs_every_reading_to_agree():
    modes = [["supported"] * 6, ["contradicted"] * 6, ["supported", "not resolved"] + ["supported"] * 4,
             ["supported"] * 6]
    table = claims.replication_table(_stored(["supported", "contradicted", "supported"], modes)).set_index("claim")
    words = table["replication"].tolist()
    assert words == ["not replicated", "replicated", "not replicated", "replicated", "contradicted",
                     "not replicated", "not replicated"]
    assert table.loc["3. LAT: its direction transfers better", "evidence"].endswith(
        "scores, mean ablation (write sites): not resolved; scores, mean ablation (block inputs): supported; "
        "scores, zero ablation, change: supported; scores, mean ablation (write sites), change: supported; "
        "scores, mean ablation (block inputs), change: supported")
    claim2_rows = _stored(["supported"] * 3, modes, second=("higher", "higher"), robust="more robust",
                          top_pc=("falls further", "falls further"))
    assert claims.replication_table(claim2_rows)["replication"].tolist()[:3] == ["replicated"] * 3
    assert claims.replication_table(claim2_rows)["replication"].tolist()[-1] == "replicated"


def test_a_claim_without_a_stored_verdict_is_not_testable_here():
    partial = [v for v in _stored(["supported"] * 3, [["supported"] * 6] * 4) if v["claim"] != "beyond"]
    last = claims.replication_table(partial).iloc[-1]
    assert (last["replication"], last["evidence"]) == (
        "not testable here", "no verdict stored by the beyond chapter in this run")


def test_claim2_band_applies_claim2s_rule_at_every_layer():
    rows = [_pairwise({"ssft": (0.01, 0.03), "at": (0.02, 0.04)}).assign(layer=12),
            _pairwise({"ssft": (0.01, 0.03), "at": (-0.01, 0.04)}).assign(layer=13),
            _pairwise({"ssft": (0.2, 0.3)}, "top-2").assign(layer=13),
            _pairwise({"base": (-0.3, -0.2)}).assign(layer=13)]
    decided, words = claims.claim2_band(pd.concat(rows, ignore_index=True))
    assert words == {12: "supported", 13: "not supported"}
    assert set(decided["versus"]) == {"ssft", "at"} and set(decided["k"]) == {"component 2"}


def test_a_verdict_that_changes_across_the_layer_band_is_not_replicated():
    stored = _stored(["supported"] * 3, [["supported"] * 6] * 4, second=("higher", "higher"))
    stored[2]["band"] = [{"layer": 9, "verdict": "supported"}, {"layer": 10, "verdict": "not supported"}]
    names = [f"LAT {name}" for name, _, _ in claims.CLAIM3]
    stored.append({"family": "f", "claim": "layer_band", "verdicts": [
        {"claim": claim, "layer": layer, "zero ablation": "supported",
         "mean ablation (write sites)": "supported" if layer == 9 or claim != names[0] else "not resolved"}
        for claim in [*names, claims.CLAIM1_MODES_ROW] for layer in (9, 10)]})
    table = claims.replication_table(stored).set_index("claim")
    assert table.loc["2. LAT's second component carries more of the harmful-harmless difference",
                     "replication"] == "not replicated"
    assert "second component at layers 9-10: higher at 1, not higher at 1 of 2 layers" in table.loc[
        "2. LAT's second component carries more of the harmful-harmless difference", "evidence"]
    assert table.loc["3. LAT: robust to foreign directions", "replication"] == "not replicated"
    assert table.loc["3. LAT: vulnerable to its own direction", "replication"] == "replicated"
    assert ("scores at the 2 layers of 9-10 where claim 1 holds, mean ablation (write sites): supported at 1, not "
            "resolved at 1 of 2 layers" in table.loc["3. LAT: robust to foreign directions", "evidence"])


def test_claim3_across_the_band_is_read_where_claim1_holds_and_claim1s_band_is_shown_not_counted():
    """At layer 10 no direction lowers its own model's refusal: claim 3 there compares no attacks, so its
    not-resolved verdict does not count; claim 1 failing at another layer does not undo it at the chosen one."""
    stored = _stored(["supported"] * 3, [["supported"] * 6] * 4)
    names = [f"LAT {name}" for name, _, _ in claims.CLAIM3]
    modes = ("zero ablation", "mean ablation (write sites)")
    stored.append({"family": "f", "claim": "layer_band", "verdicts": [
        *[{"claim": claim, "layer": layer, **dict.fromkeys(modes, "supported" if layer == 9 else "not resolved")}
          for claim in names for layer in (9, 10)],
        *[{"claim": claims.CLAIM1_MODES_ROW, "layer": layer,
           **dict.fromkeys(modes, "supported" if layer == 9 else "not supported")} for layer in (9, 10)]]})
    table = claims.replication_table(stored).set_index("claim")
    assert table.loc["3. LAT: robust to foreign directions", "replication"] == "replicated"
    assert "scores at the 1 layers of 9-10 where claim 1 holds, zero ablation: supported" in table.loc[
        "3. LAT: robust to foreign directions", "evidence"]
    claim1 = table.loc["1. Ablating a model's own refusal direction lowers its refusal"]
    assert claim1["replication"] == "replicated"
    assert claim1["evidence"].endswith("; shown, not counted: scores at layers 9-10, zero ablation: supported at 1, "
                                       "not supported at 1 of 2 layers; scores at layers 9-10, mean ablation (write "
                                       "sites): supported at 1, not supported at 1 of 2 layers")


def test_claims_1_and_2_can_be_contradicted_and_old_runs_still_read():
    assert claims.claim1_word(["refusal rises", "refusal rises"]) == "contradicted"
    assert claims.claim1_word(["refusal drops", "not resolved"]) == "not supported"
    rows = [_pairwise({"ssft": (-0.03, -0.01), "at": (-0.04, -0.02)}).assign(layer=12)]
    assert claims.claim2_band(pd.concat(rows, ignore_index=True))[1] == {12: "contradicted"}
    stored = _stored(["supported"] * 3, [["supported"] * 6] * 4, claim1="contradicted",
                     second=("lower", "lower"))
    stored[2]["band"] = [{"layer": 12, "verdict": "contradicted"}]
    for row in stored[4]["verdicts"]:  # an ablation_modes verdict stored before the block-input mode existed
        for column in ("mean ablation (block inputs)", "mean ablation (block inputs), change"):
            row.pop(column)
    stored[4]["verdicts"][-1].update(dict.fromkeys(
        ("zero ablation", "mean ablation (write sites)", "zero ablation, change", "mean ablation (write sites), change"),
        "contradicted"))
    table = claims.replication_table(stored).set_index("claim")["replication"]
    assert table["1. Ablating a model's own refusal direction lowers its refusal"] == "contradicted"
    assert table["2. LAT's second component carries more of the harmful-harmless difference"] == "contradicted"


def test_robustness_statement_names_the_variants_without_robustness():
    refusing, complying = ["refusal"] * 8, ["valid"] * 8
    under_attack = {("at", "emb"): refusing, ("lat", "l4"): complying[:4] + refusing[:4],
                    ("ssft", "emb"): complying, ("ssft-control", "emb"): complying,
                    ("ssft", "l4"): complying[:4] + refusing[:4], ("ssft-control", "l4"): complying[:4] + refusing[:4]}
    robust = claims.robustness(under_attack, ["emb", "l4"])
    assert list(robust["verdict"]) == ["more robust", "more robust", "not resolved", "not resolved"]
    statement = claims.robustness_statement(robust)
    assert statement.startswith("AT under the attack at emb: more robust than ssft (+100.0 points [+100.0, +100.0])")
    assert statement.endswith("So AT came out more robust than every reference model. Every later comparison of LAT "
                              "with SSFT compares an adapter not shown to have the property that defines it.")
    none = claims.robustness_statement(claims.robustness({**under_attack, ("at", "emb"): complying}, ["emb", "l4"]))
    assert none.endswith("So no adversarially trained variant came out more robust than every reference model. Every "
                         "later comparison of AT or LAT with SSFT compares adapters not shown to have the "
                         "property that defines them.")


def test_chosen_dose_follows_the_stated_rule():
    def measured(at, lat, accepted=True):
        robust = pd.DataFrame([{"variant": v, "versus": r, "verdict": word} for v, word in (("at", at), ("lat", lat))
                               for r in ("ssft", "ssft-control")])
        return robust, pd.DataFrame([{"variant": v, "all met": accepted} for v in ("ssft-control", "at", "lat")])

    more, none = "more robust", "not resolved"
    by_step = {70: measured(none, none), 140: measured(more, none), 210: measured(more, more, accepted=False),
               280: measured(more, more), 350: measured(more, more)}
    assert claims.chosen_dose(by_step) == {"step": 280, "rule": "first checkpoint robust and accepted",
                                           "robust": [210, 280, 350]}
    never = {70: measured(none, none), 140: measured(more, none), 210: measured(none, none, accepted=False)}
    assert claims.chosen_dose(never)["step"] == 140 and claims.chosen_dose(never)["rule"].endswith("the last accepted")
    rejected = {70: measured(more, more, accepted=False), 140: measured(none, none, accepted=False)}
    assert claims.chosen_dose(rejected) == {"step": 140, "rule": "no checkpoint accepted: the last", "robust": [70]}
    with pytest.raises(ValueError, match="at least one"):
        claims.chosen_dose({})
