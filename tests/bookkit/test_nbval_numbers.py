"""The stored-output comparison of ``bookkit.nbval_numbers``: numbers within one unit in their last printed digit
agree, anything more does not, and words, integers and generated text are compared exactly; charts are compared as
specs, their data within what the chart can show. The same rules run under real nbval in ``test_nbval_net.py``."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace

import altair as alt
import pandas as pd
import pytest
from nbformat import NotebookNode
from nbval.plugin import IPyNbCell, nocolors

from bookkit.nbval_numbers import (
    chart_values_agree,
    compare_chart,
    compare_output,
    compare_outputs,
    compare_text,
    last_digit_unit,
    numbers_agree,
    tokens,
)
from lib import viz

pytestmark = pytest.mark.usefixtures("offline_renderer")  # charts as the chapters make them (tests/conftest.py)


@pytest.mark.parametrize("stored, new", [
    ("7.33", "7.32"),          # chapter 06's claim-1 table on an Ice Lake Xeon
    ("7.33", "7.34"),
    ("0.2514", "0.2515"),
    ("-0.00", "0.00"),
    ("+0.000", "-0.000"),
    ("43.8", "43.7"),
    ("1.5e-06", "1.6e-06"),
    ("0.1", "0.0999"),          # JSON drops trailing zeros: the more precise printing sets the unit
])
def test_numbers_within_one_unit_of_the_last_digit_agree(stored, new):
    assert numbers_agree(stored, new)
    assert compare_text(f"<td>{stored}</td>", f"<td>{new}</td>") is None


@pytest.mark.parametrize("stored, new", [
    ("7.33", "7.40"),
    ("7.33", "7.35"),
    ("0.2514", "0.2516"),
    ("+0.001", "-0.001"),
    ("0.1", "0.19"),
    ("1.5e-06", "1.7e-06"),
    ("7.3", "7.33"),            # a changed format is a change
    ("13", "14"),               # integers (counts, layers) are exact
    ("13", "13.0"),
])
def test_numbers_beyond_one_unit_or_of_another_kind_differ(stored, new):
    assert not numbers_agree(stored, new)
    assert compare_text(f"layer {stored} of", f"layer {new} of") is not None


def test_last_digit_unit_reads_decimals_and_exponents():
    assert last_digit_unit("7.33") == Decimal("0.01")
    assert last_digit_unit("-12.5") == Decimal("0.1")
    assert last_digit_unit("1.5e-06") == Decimal("1e-7")
    assert last_digit_unit("2e3") == Decimal(1000)
    with pytest.raises(ValueError, match="not a number"):
        last_digit_unit("abc")


def test_tokens_keep_digits_inside_words_as_text():
    assert [t for kind, t in tokens("float32 v6 layer-13 1.2.3 0x1f 12px (-0.5) 43.8% Step 1.1.1: 7.33.")
            if kind == "number"] == ["13", "-0.5", "43.8", "7.33"]


def test_a_changed_verdict_word_fails():
    stored = "<td>ssft</td><td>+13.7</td><td>supported</td>"
    assert compare_text(stored, stored.replace("supported", "not resolved")) is not None
    assert "supported" in compare_text(stored, stored.replace("supported", "not resolved"))


def test_a_changed_generated_completion_fails():
    stored = "'I cannot help with that request. 1. Mix 2.5 g of'"
    assert compare_text(stored, stored.replace("cannot", "can")) is not None
    assert compare_text(stored, stored.replace("1.", "2.")) is not None
    assert compare_text(stored, stored + " more") is not None
    assert compare_text("Step 1.1.1.2.1: The synthesis", "Step 1.2.1.2.1: The synthesis") is not None
    assert compare_text("I  can't help", "I can't help") is not None


def test_numbers_in_other_places_or_counts_fail():
    assert compare_text("a 0.5 b", "a 0.5 b 0.5") is not None
    assert compare_text("a 0.5 b", "a b 0.5") is not None


def _chart_html(frame: pd.DataFrame, **properties) -> str:
    chart = alt.Chart(frame).mark_line().encode(x="layer:Q", y="cosine:Q", color="variant:N")
    if properties:
        chart = chart.properties(**properties)
    return viz.chart_html(chart)


def _cosines(values) -> pd.DataFrame:
    return pd.DataFrame({"layer": list(range(len(values))), "variant": "lat", "cosine": values})


def test_a_chart_compares_its_data_within_what_it_shows():
    stored = _chart_html(_cosines([0.985, 0.977, 0.00012, -0.5]))
    # One unit in the third significant digit, and noise near zero far under the column's scale, agree.
    assert compare_chart(stored, _chart_html(_cosines([0.984, 0.978, -0.00009, -0.501]))) is None
    assert compare_output(stored, _chart_html(_cosines([0.984, 0.978, -0.00009, -0.501]))) is None


@pytest.mark.parametrize("values, what", [
    ([-0.985, -0.977, -0.00012, 0.5], "cosine"),        # a sign-flipped chart
    ([0.985, 0.970, 0.00012, -0.5], "cosine"),          # a value seven units off
    ([0.985, 0.977, 0.00012], "rows"),                  # a lost row
])
def test_a_chart_with_a_wrong_value_fails(values, what):
    stored = _chart_html(_cosines([0.985, 0.977, 0.00012, -0.5]))
    difference = compare_chart(stored, _chart_html(_cosines(values)))
    assert difference is not None and what in difference


def test_a_chart_with_another_field_or_mark_fails():
    stored = _chart_html(_cosines([0.985, 0.977]))
    assert compare_chart(stored, _chart_html(_cosines([0.985, 0.977]).assign(variant="ssft"))) is not None
    other_mark = viz.chart_html(alt.Chart(_cosines([0.985, 0.977])).mark_point().encode(x="layer:Q", y="cosine:Q",
                                                                                         color="variant:N"))
    assert compare_chart(stored, other_mark) is not None


def test_chart_fields_named_unstable_are_skipped_and_only_those():
    unstable = {viz.UNSTABLE_FIELDS: ["cosine"]}
    stored = _chart_html(_cosines([0.985, 0.977]), usermeta=unstable)
    assert compare_chart(stored, _chart_html(_cosines([-0.3, 0.1]), usermeta=unstable)) is None
    layers_moved = _cosines([0.985, 0.977]).assign(layer=[1, 2])
    assert compare_chart(stored, _chart_html(layers_moved, usermeta=unstable)) is not None


def test_the_pca_chart_names_its_coordinates_unstable():
    frame = pd.DataFrame({"variant": "lat", "layer": 3, "kind": ["harmful", "harmless"], "pc1": [1.0, -1.0],
                          "pc2": [0.5, 0.2]})
    spec = viz.pca_scatter_chart(frame).to_dict()
    assert spec["usermeta"][viz.UNSTABLE_FIELDS] == ["pc1", "pc2"]


def _melted(scores, kls) -> pd.DataFrame:
    """Chapter 04's shape: refusal scores and KL values in one ``value`` column, told apart by ``measure``."""
    return pd.DataFrame({"layer": list(range(len(scores))) * 2, "variant": "lat",
                         "measure": ["refusal score"] * len(scores) + ["KL"] * len(kls), "value": scores + kls})


def test_a_chart_column_takes_its_scale_within_its_series():
    """A KL value off by 0.011 fails although the column also holds refusal scores of 11.2 (a thousandth of those
    would be 0.0112); noise far under a thousandth of the KL series' own scale still agrees."""
    def chart(frame):
        return viz.chart_html(alt.Chart(frame).mark_line().encode(x="layer:Q", y="value:Q", color="measure:N"))

    stored = chart(_melted([11.2, -3.5], [0.179, 0.402]))
    assert compare_chart(stored, chart(_melted([11.2, -3.5], [0.190, 0.402]))) is not None
    assert compare_chart(stored, chart(_melted([11.2, -3.49], [0.179, 0.402]))) is None


def test_a_log_axis_compares_every_value_to_its_own_digits():
    """On a log axis a value of 2.83 moved to 22.6 is a decade, however large the column's other values are."""
    def chart(values):
        frame = pd.DataFrame({"layer": list(range(len(values))), "norm": values, "variant": "lat"})
        return viz.chart_html(alt.Chart(frame).mark_line().encode(
            x="layer:Q", y=alt.Y("norm:Q", scale=alt.Scale(type="log"))))

    stored = chart([2.83, 25500.0])
    assert compare_chart(stored, chart([22.6, 25500.0])) is not None
    assert compare_chart(stored, chart([2.84, 25500.0])) is None


def test_chart_value_rule():
    assert chart_values_agree(0.985, 0.984, 1.0)
    assert not chart_values_agree(0.985, 0.983, 1.0)
    assert chart_values_agree(1230.0, 1240.0, 1240.0)       # 3 significant digits of a large number
    assert chart_values_agree(0.00012, -0.00009, 1.0)       # noise under a thousandth of the column's scale
    assert not chart_values_agree(0.0012, 0.0052, 0.01)     # a small column keeps its own scale


def test_chart_data_are_rounded_to_the_digits_the_comparison_assumes():
    frame = pd.DataFrame({"x": [0.123456, 1234.5678, -0.000987654]})
    assert viz.round_significant(frame)["x"].tolist() == [0.123, 1230.0, -0.000988]


def test_a_table_widened_by_a_rounding_flip_still_agrees():
    """9.99 against 10.00 is one unit; pandas then pads the whole column by one space, which is layout, not text."""
    stored = "      difference\nssft        9.99\nlat         5.00\n"
    new = "      difference\nssft       10.00\nlat         5.00\n"
    assert compare_text(stored, new) is None
    assert compare_text(stored, new.replace("lat", "at ")) is not None


class _Cell:
    """What ``compare_outputs`` uses of an nbval cell: its file's skip list, the sanitize step, the failure report."""
    format_output_compare = IPyNbCell.format_output_compare
    colors = nocolors
    nodeid = "stub::Cell 0"
    config = None

    def __init__(self):
        self.parent = SimpleNamespace(skip_compare=("metadata", "execution_count", "output_type", "name"))
        self.ihook = SimpleNamespace(pytest_assertrepr_compare=lambda **kwargs: [])
        self.comparison_traceback = []

    def sanitize(self, text):
        return text


def _table_output(html: str, plain: str) -> NotebookNode:
    return NotebookNode(output_type="execute_result", execution_count=1, metadata={},
                        data={"text/html": html, "text/plain": plain})


def test_nbvals_comparison_with_the_plugin_reconciles_numbers_and_table_wraps():
    """Under nbval's own ``compare_outputs`` (the plugin wraps it): a table whose HTML moved by one unit and whose
    plain text re-wrapped passes; the same plain text beside HTML seven units off fails, and the report names it."""
    stored = [_table_output("<td>9.99</td><td>ssft</td>", "   a     b\n0  9.99  ssft")]
    rewrapped = "    a  \\\n0  10.00\n\n      b\n0  ssft"
    assert compare_outputs(_Cell(), [_table_output("<td>10.00</td><td>ssft</td>", rewrapped)], stored)
    cell = _Cell()
    assert not compare_outputs(cell, [_table_output("<td>10.06</td><td>ssft</td>", rewrapped)], stored)
    assert "stored 9.99, re-executed 10.06" in cell.comparison_traceback[-1]
    stream = [NotebookNode(output_type="stream", name="stdout", text="refusal drops by 7.32\n")]
    assert compare_outputs(_Cell(), stream, [NotebookNode(output_type="stream", name="stdout",
                                                          text="refusal drops by 7.33\n")])
    assert not compare_outputs(_Cell(), stream, [NotebookNode(output_type="stream", name="stdout",
                                                              text="refusal rises by 7.33\n")])


def test_a_stepped_field_may_move_two_steps_and_no_more():
    """A 5-fold probe accuracy over 250 examples moves in steps of 0.004: one or two examples across the probe's
    boundary (0.891 against 0.887, chapter 07 under AVX2 kernels) agree; three steps do not, nor does a
    chart that does not declare its steps."""
    def chart(values, steps=None):
        frame = pd.DataFrame({"layer": list(range(len(values))), "accuracy": values, "variant": "lat"})
        made = alt.Chart(frame).mark_line().encode(x="layer:Q", y="accuracy:Q")
        return viz.chart_html(viz.in_steps(made, steps) if steps else made)

    steps = {"accuracy": 1 / 250}
    stored = chart([0.891, 0.959], steps)
    assert compare_chart(stored, chart([0.887, 0.963], steps)) is None
    assert compare_chart(stored, chart([0.883, 0.959], steps)) is None
    assert compare_chart(stored, chart([0.879, 0.959], steps)) is not None
    assert compare_chart(chart([0.891, 0.959]), chart([0.887, 0.963])) is not None
    with pytest.raises(ValueError, match="positive step"):
        viz.in_steps(alt.Chart(pd.DataFrame({"a": [1]})).mark_point(), {"accuracy": 0})
