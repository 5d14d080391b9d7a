"""Core numbers checked against values computed by hand (issue #43, item 5).

Every expected value below is a literal or comes from an obviously independent formula written in the test (never
from the function under test or the lib helper it uses), so an implementation that returns a wrong number fails:
the KL divergence in both directions, the difference-in-means direction and its sign, cosines, the spectral energy
shares of diag(3, 2, 1) (also rotated, and with a known mean for the centred measure), the claim-3 transfer
contrasts' groups, differences and verdicts, the d-prime separation and projecting a subspace out.
"""

import math

import pytest
import torch

from lib import claims, directions, linalg, scores, spectra
from lib.judges import BROKEN, REFUSAL, VALID

SQRT_HALF = 1 / math.sqrt(2)
KL_HALF_VS_SKEWED = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # = 0.5108
KL_SKEWED_VS_HALF = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # = 0.3681


def log_probs(*rows):
    """Log-probability rows [n, vocab] (float64, as ``lib.scores.next_token_log_probs`` returns them)."""
    return torch.tensor(rows, dtype=torch.float64).log()


def orthonormal_columns(rows, columns, seed):
    """A [rows, columns] matrix with orthonormal columns, from the QR of a seeded Gaussian matrix (float64)."""
    gaussian = torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(gaussian)[0]


def rotated_spectrum(singular_values, n=5, d=7, seed=0):
    """U diag(s) V^T with random orthonormal U [n, k], V [d, k]: a dense matrix whose singular values are ``s``.
    U's columns are signed to sum positive, so that the mean row, sum_k (sum_i U_ik / n) s_k v_k, has a positive
    component along every v_k. Returns (matrix, V)."""
    s = torch.tensor(singular_values, dtype=torch.float64)
    u = orthonormal_columns(n, len(s), seed)
    u = u * torch.sign(u.sum(0))
    v = orthonormal_columns(d, len(s), seed + 1)
    return u @ torch.diag(s) @ v.T, v


# --- lib.scores.kl_divergence --------------------------------------------------------------------------------------

def test_kl_divergence_matches_the_hand_values_in_both_directions():
    """KL(reference || other) = sum p log(p / q) in nats: KL([.5, .5] || [.9, .1]) = 0.5108 and the reverse 0.3681.
    Both directions are checked, so an implementation that returns 0 or swaps its arguments fails."""
    half, skewed = log_probs([0.5, 0.5]), log_probs([0.9, 0.1])
    assert KL_HALF_VS_SKEWED == pytest.approx(0.5108, abs=5e-5) and KL_SKEWED_VS_HALF == pytest.approx(0.3681, abs=5e-5)
    forward = scores.kl_divergence(half, skewed)
    backward = scores.kl_divergence(skewed, half)
    assert forward.shape == (1,) and backward.shape == (1,)
    assert float(forward[0]) == pytest.approx(KL_HALF_VS_SKEWED, abs=1e-6)
    assert float(backward[0]) == pytest.approx(KL_SKEWED_VS_HALF, abs=1e-6)


def test_kl_divergence_is_one_value_per_row_of_a_batch():
    """A batch of rows gives each row's own KL: (half, skewed), (skewed, half), (half, half) -> 0.5108, 0.3681, 0;
    a three-token row checks that the sum runs over the whole vocabulary axis, not over the batch."""
    reference = log_probs([0.5, 0.5], [0.9, 0.1], [0.5, 0.5])
    other = log_probs([0.9, 0.1], [0.5, 0.5], [0.5, 0.5])
    result = scores.kl_divergence(reference, other)
    assert result.shape == (3,)
    assert result.tolist() == pytest.approx([KL_HALF_VS_SKEWED, KL_SKEWED_VS_HALF, 0.0], abs=1e-6)
    three = log_probs([0.2, 0.3, 0.5])
    uniform = log_probs([1 / 3, 1 / 3, 1 / 3])
    by_hand = sum(p * math.log(p * 3) for p in (0.2, 0.3, 0.5))  # KL(p || uniform) = sum p log(p / (1/3))
    assert float(scores.kl_divergence(three, uniform)[0]) == pytest.approx(by_hand, abs=1e-6)
    logits = torch.tensor([[0.0, 0.0], [math.log(9.0), 0.0]], dtype=torch.float64)  # softmax: [.5, .5], [.9, .1]
    from_logits = scores.kl_divergence(logits[:1].log_softmax(-1), logits[1:].log_softmax(-1))
    assert float(from_logits[0]) == pytest.approx(KL_HALF_VS_SKEWED, abs=1e-6)


def test_kl_divergence_treats_a_zero_reference_probability_as_contributing_nothing():
    """KL([1, 0] || [.5, .5]) = 1 * log(1 / .5) + 0 = log 2: a token the reference never emits adds nothing."""
    certain, half = log_probs([1.0, 0.0]), log_probs([0.5, 0.5])
    assert float(scores.kl_divergence(certain, half)[0]) == pytest.approx(math.log(2), abs=1e-6)


# --- lib.directions: the difference-in-means direction and cosines ------------------------------------------------

def test_refusal_directions_recover_a_known_offset_axis_with_its_sign():
    """harmful = harmless + c * axis per layer (c > 0 along e3 at layer 0, a negative offset along e1 at layer 1):
    the unit difference in means must be exactly +e3 and -e1, pointing from harmless to harmful. The harmful set
    repeats the harmless rows twice (8 vs 4 rows), so only the means, not a pairing, can give this answer."""
    harmless = torch.randn(4, 2, 5, generator=torch.Generator().manual_seed(3))
    offset = torch.zeros(2, 5)
    offset[0, 3] = 2.5
    offset[1, 1] = -0.7
    harmful = torch.cat([harmless, harmless.flip(0)]) + offset
    expected = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0, 0.0]])
    found = directions.refusal_directions(harmful, harmless)
    assert found.shape == (2, 5)
    torch.testing.assert_close(found, expected, atol=1e-6, rtol=0)
    flipped = directions.refusal_directions(harmless, harmful)  # swapping the classes flips the sign
    torch.testing.assert_close(flipped, -expected, atol=1e-6, rtol=0)


def test_cosine_similarity_hand_values_including_the_sign():
    """cos(e0, b) for b = 3 e1, 2 e0, -5 e0, e0 + e1, -e0 + e1: 0, 1, -1, 1/sqrt(2), -1/sqrt(2), one value per row
    of a batch (along the last axis), independent of the vectors' lengths."""
    a = torch.tensor([4.0, 0.0, 0.0])
    others = torch.tensor([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0], [-5.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 1.0, 0.0]])
    expected = [0.0, 1.0, -1.0, SQRT_HALF, -SQRT_HALF]
    assert directions.cosine_similarity(a.expand(5, 3), others).tolist() == pytest.approx(expected, abs=1e-6)
    for b, cosine in zip(others, expected):
        assert float(directions.cosine_similarity(b, a)) == pytest.approx(cosine, abs=1e-6)  # symmetric


def test_cosine_matrix_is_the_table_of_hand_cosines():
    """The between-variant cosine table of chapter 04 (``cosine_matrix``) on x = 2 e0, y = e1 / 2, x + y = e0 + e1
    and -x = -3 e0: every entry equals the hand cosine (0, +-1, +-1/sqrt(2)), rows and columns in the dict's order."""
    vectors = {"x": torch.tensor([2.0, 0.0, 0.0]), "y": torch.tensor([0.0, 0.5, 0.0]),
               "x+y": torch.tensor([1.0, 1.0, 0.0]), "-x": torch.tensor([-3.0, 0.0, 0.0])}
    expected = [[1.0, 0.0, SQRT_HALF, -1.0],
                [0.0, 1.0, SQRT_HALF, 0.0],
                [SQRT_HALF, SQRT_HALF, 1.0, -SQRT_HALF],
                [-1.0, 0.0, -SQRT_HALF, 1.0]]
    table = directions.cosine_matrix(vectors)
    assert list(table.index) == list(table.columns) == ["x", "y", "x+y", "-x"]
    for row, values in zip(table.index, expected):
        assert table.loc[row].tolist() == pytest.approx(values, abs=1e-6), row


def test_separation_is_the_hand_d_prime():
    """d' = (mean harmful projection - mean harmless projection) / sqrt((var_h + var_b) / 2), sample variances.
    Projections on the difference direction e0 are harmful [2, 6] (mean 4, variance 8) and harmless [0, 2] (mean 1,
    variance 2), so d' = 3 / sqrt(5) = 1.3416; the second coordinate has equal class means and must not count."""
    harmful = torch.tensor([[[2.0, 1.0]], [[6.0, -1.0]]])
    harmless = torch.tensor([[[0.0, 2.0]], [[2.0, -2.0]]])
    assert directions.separation(harmful, harmless).tolist() == pytest.approx([3 / math.sqrt(5)], abs=1e-6)
    assert directions.separation(harmless, harmful).tolist() == pytest.approx([3 / math.sqrt(5)], abs=1e-6)


def test_project_out_removes_exactly_the_basis_components():
    """x - (x B^T) B by hand: removing e0 from [3, 4, 5] leaves [0, 4, 5]; removing (e0 + e1)/sqrt(2) from [2, 0, 1]
    leaves [2, 0, 1] - [1, 1, 0] = [1, -1, 1]; removing the plane {e0, e1} leaves [0, 0, 5]."""
    x = torch.tensor([[3.0, 4.0, 5.0]])
    torch.testing.assert_close(linalg.project_out(x, torch.tensor([[1.0, 0.0, 0.0]])), torch.tensor([[0.0, 4.0, 5.0]]))
    diagonal = torch.tensor([[SQRT_HALF, SQRT_HALF, 0.0]])
    torch.testing.assert_close(linalg.project_out(torch.tensor([[2.0, 0.0, 1.0]]), diagonal),
                               torch.tensor([[1.0, -1.0, 1.0]]), atol=1e-6, rtol=0)
    plane = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(linalg.project_out(x, plane), torch.tensor([[0.0, 0.0, 5.0]]))


# --- lib.spectra: energy shares ------------------------------------------------------------------------------------

def test_energy_fractions_and_top_k_shares_of_diag_3_2_1():
    """diag(3, 2, 1) has energies 9, 4, 1 (total 14): fractions 9/14, 4/14, 1/14 and top-1/top-2/top-3 shares 9/14,
    13/14, 1; a k beyond the rank (10) is the whole energy, 1."""
    fractions = spectra.energy_fractions(torch.diag(torch.tensor([3.0, 2.0, 1.0])))
    assert fractions.tolist() == pytest.approx([9 / 14, 4 / 14, 1 / 14], abs=1e-6)
    shares = spectra.top_k_shares(fractions, (1, 2, 3, 10))
    assert shares == pytest.approx({1: 9 / 14, 2: 13 / 14, 3: 1.0, 10: 1.0}, abs=1e-6)


def test_top_k_shares_cumulate_given_fractions():
    """``top_k_shares`` alone, on fractions written by hand: [.5, .3, .2] -> top-1 .5, top-2 .8, top-5 1."""
    assert spectra.top_k_shares(torch.tensor([0.5, 0.3, 0.2]), (1, 2, 5)) == pytest.approx({1: 0.5, 2: 0.8, 5: 1.0})


def test_shares_of_a_rotated_diag_3_2_1_are_those_of_the_diagonal():
    """U diag(3, 2, 1) V^T (a dense 5 x 7 matrix, random orthonormal U and V) has the singular values of
    diag(3, 2, 1): the same fractions (9, 4, 1, 0, 0) / 14 and the paper's table (``spectrum_frame``, uncentred)
    shows top-1 9/14, top-2 13/14, top-10 1."""
    matrix, _ = rotated_spectrum([3.0, 2.0, 1.0])
    assert (matrix.abs() > 1e-3).sum() > 20  # not diagonal
    assert spectra.energy_fractions(matrix).tolist() == pytest.approx([9 / 14, 4 / 14, 1 / 14, 0, 0], abs=1e-6)
    table = spectra.spectrum_frame({"rotated": matrix}).set_index("measure")
    row = table.loc["uncentred (paper)"]
    assert (row["top-1"], row["top-2"], row["top-10"]) == pytest.approx((9 / 14, 13 / 14, 1.0), abs=1e-6)
    assert row["n"] == 5


def test_scree_frame_gives_each_component_and_the_second_components_own_share():
    """The scree table of the rotated diag(3, 2, 1): per-component shares 9/14, 4/14 (the second component's own
    share, the quantity claim 2 is about), 1/14 and cumulative 9/14, 13/14, 1."""
    matrix, _ = rotated_spectrum([3.0, 2.0, 1.0], seed=4)
    frame = spectra.scree_frame({"rotated": matrix}, components=3)
    uncentred = frame[frame["measure"] == "uncentred (paper)"].set_index("component")
    assert uncentred["share"].tolist() == pytest.approx([9 / 14, 4 / 14, 1 / 14], abs=1e-6)
    assert uncentred["cumulative"].tolist() == pytest.approx([9 / 14, 13 / 14, 1.0], abs=1e-6)


def test_centred_and_uncentred_shares_of_a_matrix_with_a_known_mean_row():
    """D = 1 m^T + U diag(3, 2, 1) V^T with U's columns orthogonal to the all-ones vector and m orthogonal to V's
    columns, |m|^2 = 3.2, n = 5 rows. Then D^T D = n m m^T + V diag(9, 4, 1) V^T: the uncentred energies are
    16, 9, 4, 1 (fractions /30) and centring removes exactly 1 m^T, leaving 9, 4, 1 (/14)."""
    n, d = 5, 7
    basis = orthonormal_columns(n, 4, 11)
    ones = torch.ones(n, 1, dtype=torch.float64) / math.sqrt(n)
    complement = torch.linalg.qr(torch.cat([ones, basis[:, :3]], 1))[0][:, 1:]  # 3 columns orthogonal to 1
    axes = orthonormal_columns(d, 4, 12)  # V = first three columns; the mean row lies along the fourth
    mean_row = math.sqrt(3.2) * axes[:, 3]
    matrix = torch.ones(n, 1, dtype=torch.float64) * mean_row + complement @ torch.diag(
        torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ axes[:, :3].T
    assert spectra.energy_fractions(matrix)[:4].tolist() == pytest.approx([16 / 30, 9 / 30, 4 / 30, 1 / 30], abs=1e-6)
    assert spectra.energy_fractions(matrix, centred=True)[:3].tolist() == pytest.approx([9 / 14, 4 / 14, 1 / 14],
                                                                                       abs=1e-6)
    table = spectra.spectrum_frame({"m": matrix}, ks=(1, 2, 10)).set_index("measure")
    assert table.loc["uncentred (paper)", ["top-1", "top-2", "top-10"]].tolist() == pytest.approx(
        [16 / 30, 25 / 30, 1.0], abs=1e-6)
    assert table.loc["centred (PCA)", ["top-1", "top-2", "top-10"]].tolist() == pytest.approx(
        [9 / 14, 13 / 14, 1.0], abs=1e-6)


def test_layer_share_frame_gives_each_layers_hand_share():
    """Two layers of [n, layers, d] differences: rotated diag(3, 2, 1) (top-2 share 13/14, top-1 9/14) and rotated
    diag(2, 1, 1) (energies 4, 1, 1: top-2 5/6, top-1 4/6)."""
    first, _ = rotated_spectrum([3.0, 2.0, 1.0], seed=6)
    second, _ = rotated_spectrum([2.0, 1.0, 1.0], seed=8)
    tensor = torch.stack([first, second], dim=1)
    top2 = spectra.layer_share_frame({"v": tensor}, k=2)
    assert top2["layer"].tolist() == [0, 1]
    assert top2["share"].tolist() == pytest.approx([13 / 14, 5 / 6], abs=1e-6)
    assert spectra.layer_share_frame({"v": tensor}, k=1)["share"].tolist() == pytest.approx([9 / 14, 4 / 6], abs=1e-6)


def test_svd_directions_are_the_right_singular_vectors_signed_along_the_mean_row():
    """For D = U diag(3, 2, 1) V^T with U's columns summing positive, the top-2 right singular vectors are V's first
    two columns, each with a positive component along the mean row; for -D the mean row flips, and so do they."""
    matrix, v = rotated_spectrum([3.0, 2.0, 1.0], seed=2)
    expected = v[:, :2].T.float()
    torch.testing.assert_close(spectra.svd_directions(matrix, 2), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(spectra.svd_directions(-matrix, 2), -expected, atol=1e-5, rtol=0)


# --- lib.claims.transfer_contrasts ---------------------------------------------------------------------------------

N_PROMPTS = 40
# Refusals out of 40 in each cell (source direction, target model); every cell differs, so a wrong cell shows.
REFUSALS = {("ssft", "lat"): 36, ("at", "lat"): 32, ("lat", "ssft"): 11, ("at", "ssft"): 8, ("lat", "at"): 4,
            ("ssft", "at"): 6, ("lat", "lat"): 30, ("ssft", "ssft"): 2, ("at", "at"): 12}
# The contrasts as lib.claims.claim3_weights' docstring defines them (focus lat, others ssft, at): the cells each
# compares, first minus second; every comparison shares a source (about the target) or a target (the direction).
CELLS = {
    ("LAT robust to foreign directions", "target ssft"): (("at", "lat"), ("at", "ssft")),
    ("LAT robust to foreign directions", "target at"): (("ssft", "lat"), ("ssft", "at")),
    ("LAT vulnerable to its own direction", "target ssft"): (("lat", "lat"), ("lat", "ssft")),
    ("LAT vulnerable to its own direction", "target at"): (("lat", "lat"), ("lat", "at")),
    ("LAT its direction transfers better", "direction ssft"): (("lat", "at"), ("ssft", "at")),
    ("LAT its direction transfers better", "direction at"): (("lat", "ssft"), ("at", "ssft")),
}


def judged(refusals, n=N_PROMPTS):
    """``refusals`` REFUSAL labels on the first prompts, then alternating VALID and BROKEN (neither is a refusal)."""
    return [REFUSAL] * refusals + [VALID if i % 2 else BROKEN for i in range(n - refusals)]


def test_transfer_contrasts_differences_and_verdicts_by_hand():
    """Differences by hand (percentage points, refusals / 40):
    robust: vs ssft 32 - 8 = 24 -> 60; vs at 36 - 6 = 30 -> 75: supported (needs > 0) against both;
    vulnerable: vs ssft 30 - 11 = 19 -> 47.5; vs at 30 - 4 = 26 -> 65: contradicted (needs < 0) against both;
    transfers: vs ssft 4 - 6 -> -5; vs at 11 - 8 -> +7.5: different signs, so not resolved as a claim."""
    labels = {cell: judged(k) for cell, k in REFUSALS.items()}
    rows = claims.transfer_contrasts(labels, "lat", ("ssft", "at"), n_boot=1000, seed=3)
    assert [(row["claim"], row["versus"]) for row in rows] == list(CELLS)
    assert [row["difference"] for row in rows] == pytest.approx([60, 75, 47.5, 65, -5, 7.5], abs=1e-9)
    assert [row["cells"] for row in rows] == [2] * 6 and [row["n"] for row in rows] == [N_PROMPTS] * 6
    assert [row["supports if"] for row in rows] == ["difference > 0"] * 2 + ["difference < 0"] * 4
    assert [row["verdict"] for row in rows[:4]] == ["supported"] * 2 + ["contradicted"] * 2
    for row in rows:
        assert row["low"] <= row["difference"] <= row["high"]
    assert claims.claim3_verdicts(rows) == {"LAT robust to foreign directions": "supported",
                                            "LAT vulnerable to its own direction": "contradicted",
                                            "LAT its direction transfers better": "not resolved"}


def test_transfer_contrasts_use_exactly_the_documented_cells():
    """Each cell alone given a per-prompt score of 1 (all others 0): a contrast's difference is then +1 if the cell
    is its first, -1 if its second, and 0 otherwise. Run for all nine cells, this pins every contrast."""
    for cell in REFUSALS:
        values = {other: [1.0 if other == cell else 0.0] * 6 for other in REFUSALS}
        rows = {(row["claim"], row["versus"]): row for row in claims.transfer_contrasts(values, n_boot=20, seed=0)}
        for key, (first, second) in CELLS.items():
            expected = (cell == first) - (cell == second)
            assert rows[key]["difference"] == pytest.approx(expected, abs=1e-12), (cell, key)
