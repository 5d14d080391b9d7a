"""lib.stats, the bottom layer: intervals fed data whose answer is known."""

import pytest
import torch

from lib import stats


def test_bootstrap_indices_are_seeded_and_in_range():
    a, b = stats.bootstrap_indices(7, 40, seed=3), stats.bootstrap_indices(7, 40, seed=3)
    assert a.shape == (40, 7) and torch.equal(a, b) and int(a.min()) >= 0 and int(a.max()) <= 6
    assert not torch.equal(a, stats.bootstrap_indices(7, 40, seed=4))
    with pytest.raises(ValueError, match="n >= 1"):
        stats.bootstrap_indices(0)


def test_percentile_interval_is_the_2_5_and_97_5_quantiles():
    samples = torch.arange(1001, dtype=torch.float32)  # quantile q of 0..1000 is 1000 q exactly
    assert stats.percentile_interval(samples) == pytest.approx((25.0, 975.0))


def test_bootstrap_mean_interval_of_a_constant_is_the_constant_and_brackets_the_mean_otherwise():
    index = stats.bootstrap_indices(20, 500, seed=0)
    assert stats.bootstrap_mean_interval(torch.full((20,), 2.5), index) == pytest.approx((2.5, 2.5))
    values = torch.linspace(-1, 1, 20)
    low, high = stats.bootstrap_mean_interval(values, index)
    assert low < float(values.mean()) < high and high - low < 1


def test_basic_interval_reflects_the_percentile_interval_around_the_estimate():
    boots = torch.arange(1001, dtype=torch.float64) / 1000  # percentile interval (0.025, 0.975)
    assert stats.basic_interval(0.6, boots) == pytest.approx((0.6 * 2 - 0.975, 0.6 * 2 - 0.025))


def test_wilson_interval_and_verdict_words():
    assert stats.wilson_interval(0, 10)[0] == 0.0 and 0 < stats.wilson_interval(0, 10)[1] < 0.35
    low, high = stats.wilson_interval(50, 100)
    assert low == pytest.approx(1 - high) and low < 0.5 < high
    with pytest.raises(ValueError, match="positive"):
        stats.wilson_interval(1, 0)
    assert [stats.verdict(lo, hi, "up", "down", "open") for lo, hi in ((0.1, 2), (-2, -0.1), (-1, 1))] == \
        ["up", "down", "open"]


def test_interval_text_writes_estimate_then_interval_in_one_format():
    from lib.stats import interval_text

    assert interval_text(0.1234, -0.5, 1.0, "+.3f") == "+0.123 [-0.500, +1.000]"
    assert interval_text(4.62, 3.9, 5.31, ".1f") == "4.6 [3.9, 5.3]"


def test_a_bound_within_float_noise_of_zero_is_reported_on_the_edge():
    """An interval [0.0004, 2] (a bound 0.0002 of its width from 0) decides nothing: the last bits of float32 could
    put it below 0 on another CPU; [0.01, 2] still decides, and an exact 0 (from judged labels) stays undecided."""
    words = ("up", "down", "open")
    assert stats.verdict(0.0004, 2.0, *words) == stats.ON_THE_EDGE
    assert stats.verdict(-2.0, -0.0004, *words) == stats.ON_THE_EDGE
    assert stats.verdict(-1.0, 0.0009, *words) == stats.ON_THE_EDGE
    assert stats.verdict(0.01, 2.0, *words) == "up"
    assert stats.verdict(0.0, 12.5, *words) == "open"
    assert stats.verdict(-0.003, 1.0, *words) == "open"


def test_transfer_contrasts_report_a_contrast_on_the_edge(monkeypatch):
    """A contrast whose interval starts a hair above 0 is "on the edge", not "supported"; one clear of 0 decides."""
    from lib import claims

    cells = {(s, t): [1.0, 2.0] for s in ("lat", "ssft", "at") for t in ("lat", "ssft", "at")}
    edge = {"difference": 1.0, "low": 1e-6, "high": 2.0}
    monkeypatch.setattr(claims, "bootstrap_combination", lambda *a, **k: edge)
    assert [row["verdict"] for row in claims.transfer_contrasts(cells)] == [stats.ON_THE_EDGE] * 6
    clear = {"difference": 1.0, "low": 0.5, "high": 2.0}
    monkeypatch.setattr(claims, "bootstrap_combination", lambda *a, **k: clear)
    assert [row["verdict"] for row in claims.transfer_contrasts(cells)] == ["supported"] * 2 + ["contradicted"] * 4
