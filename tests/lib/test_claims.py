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
