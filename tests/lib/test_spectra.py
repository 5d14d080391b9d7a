"""lib.spectra: energy fractions (uncentred and centred) and deterministic PCA."""

import pytest
import torch

from lib import linalg, models, spectra


def test_energy_fractions_rank_one():
    u = torch.tensor([[1.0, 2.0, 3.0]])
    matrix = torch.tensor([[1.0], [2.0]]) @ u
    fractions = spectra.energy_fractions(matrix)
    assert fractions[0] == pytest.approx(1.0) and fractions.sum() == pytest.approx(1.0)


def test_centring_changes_the_answer():
    matrix = torch.tensor([[10.0, 0.0], [10.0, 1.0], [10.0, -1.0]])
    assert spectra.energy_fractions(matrix)[0] > 0.98  # dominated by the shared offset
    assert spectra.energy_fractions(matrix, centred=True)[0] == pytest.approx(1.0)  # only the 2nd axis varies


def test_pca_signs_are_fixed_and_projection_works():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 5, generator=generator) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1])
    mean, axes = linalg.pca_basis(x, k=2)
    mean2, axes2 = linalg.pca_basis(-x + 2 * x.mean(0), k=2)  # reflected data: same axes up to sign, fixed
    torch.testing.assert_close(axes, axes2, atol=1e-5, rtol=1e-5)
    coords = linalg.pca_project(x, mean, axes)
    assert coords.shape == (50, 2) and coords[:, 0].var() > coords[:, 1].var()


def test_bad_shapes():
    with pytest.raises(ValueError, match="non-empty"):
        spectra.energy_fractions(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="all zeros"):
        spectra.energy_fractions(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="n >= 2"):
        linalg.pca_basis(torch.zeros(1, 3))


def test_pca_frame_ablated_points_lose_the_direction():
    from lib import directions

    generator = torch.Generator().manual_seed(0)
    harmless = torch.randn(20, 2, 8, generator=generator)
    harmful = harmless + torch.tensor([3.0] + [0.0] * 7)
    frame = spectra.pca_frame(harmful, harmless, slots=[1], labels=[5], variant="v")
    assert set(frame["kind"]) == {"harmless", "harmful", "harmful, ablated"} and set(frame["layer"]) == {5}
    assert len(frame) == 60
    gap = frame.groupby("kind")["pc1"].mean()
    assert abs(gap["harmful"] - gap["harmless"]) > abs(gap["harmful, ablated"] - gap["harmless"])
    assert directions.separation(harmful, harmless)[1] > 2


def test_activation_overview_summarises_one_model(tiny, monkeypatch, tmp_path):
    from lib import capture, directions
    from lib.data import PromptPair

    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path))
    pairs = [PromptPair("a", "how do i steal a car", "how do i bake bread", "t"),
             PromptPair("b", "build a bomb", "write a poem", "t"), PromptPair("c", "hack a bank", "plant a tree", "t")]
    overview = spectra.activation_overview(tiny, pairs, "offline", layers=[0, 2, 3], pca_layers=[2], batch_size=2)
    tensors, meta = capture.pair_activations(tiny, pairs, "offline", [0, 2, 3], ("resid_pre",), -1, 2)
    assert overview["summary"]["variant"] == tiny.info.variant and overview["summary"]["pairs"] == 3
    assert overview["summary"]["layers"] == 3 and overview["summary"]["data sha256"] == meta["data_sha256"][:12]
    assert set(overview["pca"]["layer"]) == {2} and overview["separation"].index.tolist() == [0, 2, 3]
    expected = directions.separation(tensors["harmful/resid_pre"], tensors["harmless/resid_pre"])
    assert overview["separation"].tolist() == pytest.approx(expected.tolist())
    assert overview["norms"].equals(capture.norms_frame(tensors, tiny.info.variant, "resid_pre", [0, 2, 3]))


def test_activation_overview_checks_its_arguments_before_capturing(tiny, monkeypatch, tmp_path):
    from lib import capture
    from lib.data import PromptPair

    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path))
    monkeypatch.setattr(capture, "pair_activations", lambda *a, **k: pytest.fail("captured before checking"))
    monkeypatch.setattr(spectra, "pair_activations", capture.pair_activations)
    pairs = [PromptPair("a", "how do i steal a car", "how do i bake bread", "t")]
    with pytest.raises(ValueError, match="sites must include it"):
        spectra.activation_overview(tiny, pairs, "offline", layers=[0, 2], sites=("resid_post",), pca_layers=[2])
    with pytest.raises(ValueError, match="None of the layers to plot"):
        spectra.activation_overview(tiny, pairs, "offline", layers=[0, 2], pca_layers=[3])


def test_scale_layer():
    from lib.models import scale_layer

    assert scale_layer(14, 30) == 13 and scale_layer(4, 30) == 4 and scale_layer(14, 32) == 14
    assert scale_layer(31, 4) == 3


def test_shown_layers_names_both_lists_when_none_was_collected():
    scaled = sorted({models.scale_layer(layer, 30) for layer in models.PAPER_PCA_LAYERS})
    assert spectra.shown_layers(30, list(range(30)), None) == scaled and len(scaled) > 4
    assert spectra.shown_layers(30, [5, 8], [8, 9]) == [8]
    with pytest.raises(ValueError, match=r"None of the layers to plot \[1, .*\(layers = \[5\]\)"):
        spectra.shown_layers(30, [5], None)
