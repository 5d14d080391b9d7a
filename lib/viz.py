"""Altair charts that render offline and reproducibly in notebooks, nbval and the built book.

Altair's own HTML output loads Vega from a CDN and uses a random element id per render; its JSON mimetype
(``application/vnd.vegalite.v6.json``) is dropped by papermill. :func:`enable_offline_renderer` replaces both with a
``text/html`` bundle: a ``<div>`` whose id is a hash of the chart spec and a ``<script>`` that calls ``vegaEmbed``.
``vegaEmbed`` comes from ``book/_static/vega-bundle.js``, written by ``bookkit.site_assets`` (``python -m
bookkit.site_assets --write-bundle book/_static``) and loaded on every page of the book (``html_js_files`` in
``_config.yml``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import altair as alt
import pandas as pd
from IPython.display import Markdown

from lib.stats import interval_text


RENDERER_NAME = "refusal_book"
BUNDLE_NAME = "vega-bundle.js"
EMBED_OPTIONS: dict[str, Any] = {"actions": False, "renderer": "svg"}
SIGNIFICANT_DIGITS = 3  # chart data: what the eye can see, and specs that stay small and stable across CPUs
CHART_CLASS = "refusal-book-chart"  # the class of every chart's <div> (how the stored-output comparison finds charts)
# A chart's ``usermeta`` entry naming the data fields whose values the last bits of float32 can move far (PCA
# coordinates: sign and rotation); the stored-output comparison skips them and the chapter shows a stable summary.
UNSTABLE_FIELDS = "unstable_fields"
# A chart's ``usermeta`` entry giving the smallest step in which a data field moves (``in_steps``).
FIELD_STEPS = "field_steps"
DEFAULT_MAX_ROWS = 20_000

# Fixed order and colours so that every chapter shows the same kind in the same colour.
KIND_ORDER = ["harmless", "harmful", "harmful, ablated"]
KIND_COLOURS = ["#4c78a8", "#e45756", "#f58518"]
SPLIT_ORDER = ["harmful", "harmless"]


# --------------------------------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------------------------------


def _canonical_json(spec: dict) -> str:
    """Key-sorted, compact, ASCII-only JSON: the same spec gives the same text on every machine."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def spec_id(spec: dict) -> str:
    """Element id for a chart: ``vl-`` plus the first 16 hex digits of the SHA-256 of its canonical JSON."""
    return "vl-" + hashlib.sha256(_canonical_json(spec).encode("ascii")).hexdigest()[:16]


def _script_safe(text: str) -> str:
    """Escape ``<``, ``>`` and ``&`` so that the JSON cannot close the ``<script>`` element it sits in."""
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def spec_to_html(spec: dict) -> str:
    """HTML for one Vega-Lite spec: a ``<div>`` with a hashed id plus a ``vegaEmbed`` call (no network access)."""
    div_id = spec_id(spec)
    spec_js = _script_safe(_canonical_json(spec))
    options_js = json.dumps(EMBED_OPTIONS, sort_keys=True)
    return (
        f'<div id="{div_id}" class="{CHART_CLASS}"></div>\n'
        '<script type="text/javascript">\n'
        "(function () {\n"
        f"  var spec = {spec_js};\n"
        "  var embed = function () {\n"
        '    if (typeof window.vegaEmbed !== "function") {\n'
        f'      document.getElementById("{div_id}").textContent = '
        f'"[chart not rendered: {BUNDLE_NAME} is not loaded on this page]";\n'
        "      return;\n"
        "    }\n"
        f'    window.vegaEmbed("#{div_id}", spec, {options_js}).catch(function (err) {{ console.error(err); }});\n'
        "  };\n"
        '  if (document.readyState === "loading") {\n'
        '    document.addEventListener("DOMContentLoaded", embed);\n'
        "  } else {\n"
        "    embed();\n"
        "  }\n"
        "})();\n"
        "</script>"
    )


def offline_renderer(spec: dict, **metadata: Any) -> dict[str, str]:
    """Altair renderer: a ``text/html`` mimebundle (plus a short, stable ``text/plain`` fallback)."""
    if not isinstance(spec, dict):
        raise TypeError(f"the {RENDERER_NAME!r} renderer expects a Vega-Lite spec dict, got {type(spec).__name__}")
    return {"text/html": spec_to_html(spec), "text/plain": f"<altair chart {spec_id(spec)}>"}


def enable_offline_renderer(max_rows: int | None = DEFAULT_MAX_ROWS) -> None:
    """Register and enable the ``refusal_book`` renderer; inline data up to ``max_rows`` rows (None: no limit).

    Altair's default limit is 5,000 rows; PCA scatters of several layers and variants go past it. The limit stays
    as a guard against accidentally inlining a huge table into a notebook. Data stay where the chart uses them
    (``"data": {"values": [...]}``) instead of in datasets named by a hash of their content, so that two runs of a
    chart differ only where their numbers do.
    """
    alt.renderers.register(RENDERER_NAME, offline_renderer)
    alt.renderers.enable(RENDERER_NAME)
    alt.data_transformers.enable("default", max_rows=max_rows)
    alt.data_transformers.consolidate_datasets = False


def chart_html(chart: alt.TopLevelMixin) -> str:
    """The HTML that the offline renderer shows for ``chart`` (whatever renderer is enabled now)."""
    return spec_to_html(chart.to_dict())


# --------------------------------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------------------------------


def _round_sig(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """Round one number to ``digits`` significant digits (NaN and infinities are returned unchanged)."""
    if value is None or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


def round_significant(df: pd.DataFrame, digits: int = SIGNIFICANT_DIGITS) -> pd.DataFrame:
    """Copy of ``df`` with every float column rounded to ``digits`` significant digits."""
    out = df.copy()
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]):
            out[column] = out[column].map(lambda v: _round_sig(v, digits))
    return out


def _check_columns(df: pd.DataFrame, required: list[str], chart: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{chart}: missing column(s) {missing}; the DataFrame has {list(df.columns)}")


def _ordered(values: pd.Series, preferred: list[str]) -> list[str]:
    """Domain for a nominal scale: the preferred order first, then any other values sorted."""
    present = [str(v) for v in pd.unique(values)]
    return [v for v in preferred if v in present] + sorted(v for v in present if v not in preferred)


def interval_table(df: pd.DataFrame, value: str, index: list[str], columns: str | None = None, digits: int = 3,
                   low: str = "low", high: str = "high", signed: bool = False) -> pd.DataFrame:
    """A compact table of "value [low, high]" strings, rows ``index`` and (optionally) one column per value of
    ``columns``, in order of first appearance: intervals that fit a page instead of three numeric columns each."""
    _check_columns(df, [value, low, high, *index] + ([columns] if columns else []), "interval_table")

    spec = f"{'+' if signed else ''}.{digits}f"
    cells = [interval_text(v, lo, hi, spec) for v, lo, hi in zip(df[value], df[low], df[high])]
    label = f"{value} [95% CI]"
    frame = df[index + ([columns] if columns else [])].assign(**{label: cells})
    if not columns:
        return frame.set_index(index)
    return frame.pivot_table(index=index, columns=columns, values=label, aggfunc="first", sort=False)


MARKDOWN_SPECIALS = "\\`*_[]<>#|"


def prose(text: str) -> Markdown:
    """A computed sentence as Markdown to glue into the page's prose (``{glue:md}``), where it wraps like the text
    around it; every character Markdown would read as markup is escaped, so the sentence shows as written."""
    return Markdown("".join("\\" + ch if ch in MARKDOWN_SPECIALS else ch for ch in text))


def report_table(df: pd.DataFrame, index: dict[str, str], value: tuple[str, str], keep: dict[str, str] | None = None,
                 digits: int = 3, signed: bool = True) -> pd.DataFrame:
    """A table as a reader reads it: rows ``index`` and columns ``keep`` (each a mapping from the column's name in
    ``df`` to the name the page shows, in that order), one column for the estimate (``value``: its column in
    ``df`` and the name shown) and one for its 95% interval, "[low, high]" — instead of raw ``low``/``high``
    columns and code names."""
    keep = keep or {}
    _check_columns(df, [value[0], "low", "high", *index, *keep], "report_table")
    spec = f"{'+' if signed else ''}.{digits}f"
    frame = df[list(index)].rename(columns=index).assign(**{
        value[1]: [f"{v:{spec}}" for v in df[value[0]]],
        "95% interval": [f"[{lo:{spec}}, {hi:{spec}}]" for lo, hi in zip(df["low"], df["high"])]})
    for column, shown in keep.items():
        frame[shown] = df[column].to_numpy()
    return frame.set_index(list(index.values()))


def layer_norms_chart(df: pd.DataFrame) -> alt.Chart:
    """Line chart of mean residual-stream norm against layer; colour = variant, dash = split.

    ``df`` columns: ``variant``, ``layer``, ``split`` ('harmful' / 'harmless'), ``mean_norm``.
    """
    _check_columns(df, ["variant", "layer", "split", "mean_norm"], "layer_norms_chart")
    data = df[["variant", "layer", "split", "mean_norm"]].copy()
    data["variant"] = data["variant"].astype(str)
    data["split"] = data["split"].astype(str)
    data["layer"] = data["layer"].astype(int)
    data["mean_norm"] = data["mean_norm"].astype(float)
    data = round_significant(data).sort_values(["variant", "split", "layer"], kind="stable").reset_index(drop=True)
    variants = sorted(data["variant"].unique())
    splits = _ordered(data["split"], SPLIT_ORDER)
    return (
        alt.Chart(data, title="Mean residual-stream norm by layer (last prompt token)")
        .mark_line(strokeWidth=2)
        .encode(
            x=alt.X("layer:Q", title="Layer (residual stream entering the block)",
                    axis=alt.Axis(format="d", tickMinStep=1)),
            y=alt.Y("mean_norm:Q", title="Mean L2 norm of the residual stream"),
            color=alt.Color("variant:N", title="Model variant", scale=alt.Scale(domain=variants)),
            strokeDash=alt.StrokeDash("split:N", title="Prompts", scale=alt.Scale(domain=splits)),
            tooltip=[
                alt.Tooltip("variant:N", title="variant"),
                alt.Tooltip("split:N", title="prompts"),
                alt.Tooltip("layer:Q", title="layer"),
                alt.Tooltip("mean_norm:Q", title="mean norm", format=".4g"),
            ],
        )
        .properties(width=480, height=300)
    )


def pca_scatter_chart(df: pd.DataFrame) -> alt.FacetChart:
    """Scatter of the first two principal components, one panel per layer (one row per variant if several).

    ``df`` columns: ``layer``, ``kind`` ('harmless' / 'harmful' / 'harmful, ablated'), ``pc1``, ``pc2``, ``variant``.
    Axes are independent per panel: each layer has its own PCA.
    """
    _check_columns(df, ["layer", "kind", "pc1", "pc2", "variant"], "pca_scatter_chart")
    data = df[["variant", "layer", "kind", "pc1", "pc2"]].copy()
    data["variant"] = data["variant"].astype(str)
    data["kind"] = data["kind"].astype(str)
    data["layer"] = data["layer"].astype(int)
    data[["pc1", "pc2"]] = data[["pc1", "pc2"]].astype(float)
    data = round_significant(data).sort_values(["variant", "layer", "kind"], kind="stable").reset_index(drop=True)
    kinds = _ordered(data["kind"], KIND_ORDER)
    colours = [KIND_COLOURS[KIND_ORDER.index(k)] for k in kinds if k in KIND_ORDER]
    colour_scale = alt.Scale(domain=kinds, range=colours) if len(colours) == len(kinds) else alt.Scale(domain=kinds)
    base = (
        alt.Chart(data)
        .mark_circle(size=18, opacity=0.6)
        .encode(
            x=alt.X("pc1:Q", title="PC 1"),
            y=alt.Y("pc2:Q", title="PC 2"),
            color=alt.Color("kind:N", title="Activations", scale=colour_scale),
            tooltip=[
                alt.Tooltip("variant:N", title="variant"),
                alt.Tooltip("layer:Q", title="layer"),
                alt.Tooltip("kind:N", title="kind"),
                alt.Tooltip("pc1:Q", title="PC 1", format=".4g"),
                alt.Tooltip("pc2:Q", title="PC 2", format=".4g"),
            ],
        )
        .properties(width=104, height=104)
    )
    title = "Harmless, harmful and ablated activations: first two principal components per layer"
    layer_header = alt.Header(labelExpr="'layer ' + datum.value")
    if data["variant"].nunique() > 1:
        chart = base.facet(
            row=alt.Row("variant:N", title="Model variant", sort=sorted(data["variant"].unique())),
            column=alt.Column("layer:O", title=None, header=layer_header),
        )
    else:
        chart = base.facet(facet=alt.Facet("layer:O", title=None, header=layer_header), columns=4)
    return chart.resolve_scale(x="independent", y="independent").properties(
        title=title, usermeta={UNSTABLE_FIELDS: ["pc1", "pc2"]})


def in_steps(chart: alt.TopLevelMixin, steps: dict[str, float]) -> alt.TopLevelMixin:
    """``chart`` with the smallest step in which each named data field moves recorded in its ``usermeta`` (for
    example 1/n for an accuracy over n held-out examples). The stored-output comparison lets such a value move by
    two steps: a fitted probe whose boundary moves with the last bits of float32 can put an example on its other
    side on another CPU, which moves the accuracy by a whole step at once."""
    if not steps or any(not (isinstance(v, float | int) and v > 0) for v in steps.values()):
        raise ValueError(f"steps must map data fields to positive step sizes, got {steps!r}.")
    return chart.properties(usermeta={FIELD_STEPS: {field: float(step) for field, step in steps.items()}})


def training_curves_chart(df: pd.DataFrame) -> alt.Chart:
    """Training loss per step, one line per variant (a rolling mean over 5 steps smooths batch noise).

    ``df`` columns: ``variant``, ``step``, ``loss``.
    """
    _check_columns(df, ["variant", "step", "loss"], "training_curves_chart")
    data = df[["variant", "step", "loss"]].copy().sort_values(["variant", "step"], kind="stable")
    data["smoothed"] = data.groupby("variant")["loss"].transform(lambda s: s.rolling(5, min_periods=1).mean())
    data = round_significant(data.reset_index(drop=True))
    return (
        alt.Chart(data, title="Training loss (LM loss on the response tokens; under attack for AT and LAT)")
        .mark_line(strokeWidth=2)
        .encode(
            x=alt.X("step:Q", title="Optimiser step"),
            y=alt.Y("smoothed:Q", title="Loss, rolling mean of 5 steps"),
            color=alt.Color("variant:N", title="Variant", scale=alt.Scale(domain=sorted(data["variant"].unique()))),
            tooltip=["variant:N", "step:Q", alt.Tooltip("loss:Q", format=".4g")],
        )
        .properties(width=480, height=260)
    )


def rates_chart(df: pd.DataFrame, label: str, group: str, facet: str | None = None, title: str = "") -> alt.Chart:
    """Bars of a rate (%) with 95% interval whiskers: ``df`` has columns ``group``, ``f"{label} %"``,
    ``f"{label} CI low"``, ``f"{label} CI high"`` and ``n`` (as made by ``lib.judges.rate_table``)."""
    value, low, high = f"{label} %", f"{label} CI low", f"{label} CI high"
    columns = [group, value, low, high, "n"] + ([facet] if facet else [])
    _check_columns(df, columns, "rates_chart")
    data = round_significant(df[columns].rename(columns={value: "rate", low: "low", high: "high"}).reset_index(drop=True))
    order = list(dict.fromkeys(data[group].astype(str)))
    base = alt.Chart(data).encode(x=alt.X(f"{group}:N", title=group, sort=order))
    bars = base.mark_bar(opacity=0.8).encode(
        y=alt.Y("rate:Q", title=f"{label} rate (%)", scale=alt.Scale(domain=[0, 100])),
        color=alt.Color(f"{group}:N", legend=None, sort=order),
        tooltip=[f"{group}:N", alt.Tooltip("rate:Q", format=".1f"), alt.Tooltip("low:Q", format=".1f"),
                 alt.Tooltip("high:Q", format=".1f"), "n:Q"])
    whiskers = base.mark_rule(color="black").encode(y="low:Q", y2="high:Q")
    chart = (bars + whiskers).properties(width=220, height=220)
    if facet:
        chart = chart.facet(column=alt.Column(f"{facet}:N", title=None))
    return chart.properties(title=title or f"{label} rate with 95% interval")


@dataclass(frozen=True)
class Layout:
    """How a chart is laid out beyond its data: axis titles (default: the column names), a log scale for y, small
    multiples, one per value of the ``facet`` column (in rows of ``columns`` panels, each with its own y scale when
    ``independent_y``: measures of different units side by side), and a vertical line marking one x (``mark_x``,
    e.g. the layer a verdict was computed at)."""

    x_title: str | None = None
    y_title: str | None = None
    log_y: bool = False
    facet: str | None = None
    mark_x: float | None = None
    columns: int | None = None
    independent_y: bool = False


PERCENT_COLOURS = alt.Scale(scheme="blues", domain=[0, 100])  # rates in percent, on their whole range


def heatmap_chart(df: pd.DataFrame, x: str, y: str, value: str, title: str, colours: str | alt.Scale = "blues",
                  text_format: str = ".2f", layout: Layout = Layout()) -> alt.Chart:
    """A labelled heatmap: one cell per (x, y) coloured by ``value`` (``colours``: a Vega colour scheme over the
    data's range, or a whole ``alt.Scale`` such as ``PERCENT_COLOURS``) with the value printed in it (columns keep
    the order in which they first appear in ``df``)."""
    facet = layout.facet
    columns = [x, y, value] + ([facet] if facet else [])
    _check_columns(df, columns, "heatmap_chart")
    data = round_significant(df[columns].reset_index(drop=True))
    x_order, y_order = list(dict.fromkeys(data[x].astype(str))), list(dict.fromkeys(data[y].astype(str)))
    scale = colours if isinstance(colours, alt.Scale) else alt.Scale(scheme=colours)
    base = alt.Chart(data).encode(x=alt.X(f"{x}:N", title=layout.x_title or x, sort=x_order),
                                  y=alt.Y(f"{y}:N", title=layout.y_title or y, sort=y_order))
    cells = base.mark_rect().encode(color=alt.Color(f"{value}:Q", title=value, scale=scale),
                                    tooltip=[f"{x}:N", f"{y}:N", alt.Tooltip(f"{value}:Q", format=text_format)])
    labels = base.mark_text(fontSize=11).encode(text=alt.Text(f"{value}:Q", format=text_format))
    chart = (cells + labels).properties(width=max(160, 44 * len(x_order)), height=max(120, 30 * len(y_order)))
    if facet:
        chart = chart.facet(column=alt.Column(f"{facet}:N", title=None))
    return chart.properties(title=title)


def lines_chart(df: pd.DataFrame, x: str, y: str, colour: str, title: str, layout: Layout = Layout(),
                rule: float | None = None, band: tuple[str, str] | None = None) -> alt.Chart:
    """Lines of ``y`` against a quantitative ``x``, one per ``colour`` (titles, scale and facets by ``layout``),
    with an optional horizontal reference line at ``rule`` and an optional shaded interval between the two columns
    named by ``band`` (low, high)."""
    facet = layout.facet
    columns = [x, y, colour] + [c for c in (facet,) if c] + list(band or ())
    _check_columns(df, columns, "lines_chart")
    data = round_significant(df[columns].reset_index(drop=True))
    data[colour] = data[colour].astype(str)
    x_encoding = alt.X(f"{x}:Q", title=layout.x_title or x)
    colour_encoding = alt.Color(f"{colour}:N", title=colour, sort=list(dict.fromkeys(data[colour])))
    encoding = dict(x=x_encoding,
                    y=alt.Y(f"{y}:Q", title=layout.y_title or y,
                            scale=alt.Scale(type="log" if layout.log_y else "linear")),
                    color=colour_encoding,
                    tooltip=[f"{c}:N" for c in (colour, facet) if c] + [f"{x}:Q",
                             alt.Tooltip(f"{y}:Q", format=".4g")] + [f"{c}:Q" for c in band or ()])
    base = alt.Chart(data)
    chart = base.mark_line(point=True, strokeWidth=2).encode(**encoding)
    if band:
        low, high = band
        chart = base.mark_area(opacity=0.18).encode(x=x_encoding, y=f"{low}:Q", y2=f"{high}:Q",
                                                     color=colour_encoding) + chart
    chart = chart.properties(width=420, height=240)
    if rule is not None:
        chart = chart + alt.Chart(pd.DataFrame({"rule": [rule]})).mark_rule(color="grey", strokeDash=[4, 4]).encode(
            y="rule:Q")
    if layout.mark_x is not None:
        chart = chart + alt.Chart(pd.DataFrame({"mark": [layout.mark_x]})).mark_rule(color="black").encode(
            x=alt.X("mark:Q", title=None))
    if facet and layout.columns:
        chart = chart.facet(facet=alt.Facet(f"{facet}:N", title=None, sort=list(dict.fromkeys(data[facet]))),
                            columns=layout.columns)
    elif facet:
        chart = chart.facet(column=alt.Column(f"{facet}:N", title=None))
    if facet and layout.independent_y:
        chart = chart.resolve_scale(y="independent")
    return chart.properties(title=title)


def scree_chart(df: pd.DataFrame, title: str) -> alt.Chart:
    """Bars of each component's share with the cumulative share as a line, one panel per variant, a row per
    measure; 95% intervals as whiskers on both when ``df`` has them. ``df`` as made by ``lib.spectra.scree_frame``."""
    _check_columns(df, ["variant", "measure", "component", "share", "cumulative"], "scree_chart")
    data = round_significant(df.reset_index(drop=True))
    with_intervals = {"low", "high", "cumulative_low", "cumulative_high"} <= set(data.columns)
    tooltip = ["variant:N", "component:O", alt.Tooltip("share:Q", format=".3f"),
               alt.Tooltip("cumulative:Q", format=".3f")]
    if with_intervals:
        tooltip += [alt.Tooltip(f"{c}:Q", format=".3f") for c in ("low", "high", "cumulative_low", "cumulative_high")]
    base = alt.Chart(data).encode(x=alt.X("component:O", title="Component"))
    bars = base.mark_bar(opacity=0.75).encode(y=alt.Y("share:Q", title="Share of energy",
                                                       scale=alt.Scale(domain=[0, 1])), tooltip=tooltip)
    line = base.mark_line(point=True, color="black").encode(y="cumulative:Q")
    layers = [bars, line]
    if with_intervals:
        layers += [base.mark_rule(color="#444").encode(y="low:Q", y2="high:Q"),
                   base.mark_rule(color="black").encode(y="cumulative_low:Q", y2="cumulative_high:Q")]
    variants = list(dict.fromkeys(data["variant"].astype(str)))
    return alt.layer(*layers).properties(width=150, height=150).facet(
        column=alt.Column("variant:N", title=None, sort=variants),
        row=alt.Row("measure:N", title=None)).properties(title=title)
