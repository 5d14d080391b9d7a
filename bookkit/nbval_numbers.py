"""nbval's comparison of stored and re-executed outputs, with numbers compared as numbers (a pytest plugin).

nbval re-executes every chapter and compares each output with the one stored in the notebook, character for
character. The printed floats are rounded from float32 computations whose last bits differ between CPU
generations (oneDNN, MKL and torch choose kernels by instruction set, and the thread count changes the order of
reductions), so a value close to a rounding boundary prints as 7.33 on one host and 7.32 on another, and the
suite goes red for a reader who changed nothing. This plugin keeps nbval as the runner and changes one thing: a
stored and a new output that nbval's sanitized comparison finds different are compared once more, token by token,
by :func:`compare_text`:

* the text between numbers must be identical (words, verdicts, generated completions, field names), except that
  runs of two or more spaces count as equal: tables pad their columns to the widest number, and 9.99 against 10.00
  widens one;
* integers (no decimal point, no exponent) must be identical: counts, layer indices, sizes;
* decimals (a decimal point or an exponent) must agree within one unit in the last printed digit of the more
  precisely printed of the two: ``|a - b| <= 10**(exponent - decimals)``, computed exactly in decimal arithmetic.
  7.33 against 7.32 agrees; 7.33 against 7.40 does not; in a chart spec, where JSON drops trailing zeros, 0.1
  against 0.0999 agrees (0.0001 apart, one unit of 0.0999) and 0.1 against 0.19 does not.

Charts (the HTML of ``lib.viz``'s renderer) are compared as the Vega-Lite specs they embed, by
:func:`compare_chart`: the HTML around the spec and every part of the spec but its data are compared exactly (marks,
encodings, fields, categories, integers, row order), and each float in the data rows within the larger of one unit
in its own ``lib.viz.SIGNIFICANT_DIGITS``-th significant digit (the charts round their data so) and a thousandth of
the largest magnitude in its column within its series (rows with the same text fields: variant, measure, ...):
under a pixel at that line's scale, where values near zero carry only noise. A field on a log axis has only the
first rule, since every decade of it shows.
A field that the chart declares to move in steps (``lib.viz.in_steps``: an accuracy over n examples moves in steps
of 1/n) may also move by ``STEPS_ALLOWED`` steps. The fields a chart names in ``usermeta`` as unstable (PCA
coordinates, whose sign and rotation the last bits of float32 can move) are skipped; the chapter shows a stable
summary of them in a table.

A table's plain-text fallback is taken as agreeing when the HTML beside it in the same output does (pandas wraps
plain text at 80 columns, and a widened number can move a column across the wrap).

When the two agree, the new output is replaced by the stored one and nbval's own comparison runs unchanged, so the
cell passes; when they do not, nbval reports the difference as it always does, with one more line that names the
first token beyond the tolerance. The sanitize rules (``--nbval-sanitize-with``) apply before either comparison.

With ``$NBVAL_NUMBERS_REPORT`` set to a file, every pair of outputs that differs at all is appended to it as one
JSON line (cell, output key, stored and re-executed text after the sanitize rules, and the first difference beyond
the tolerance or null): what another host printed, for checking the rule against it afterwards.

Loaded by ``-p bookkit.nbval_numbers``: ``bookkit.suite`` passes it to every chapter job, and ``addopts`` in
``pyproject.toml`` to every pytest run in the repository.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from decimal import Decimal

from nbval.plugin import IPyNbCell

from lib.viz import CHART_CLASS, FIELD_STEPS, SIGNIFICANT_DIGITS, UNSTABLE_FIELDS

# A number is an optional sign, digits, an optional fraction and an optional exponent, standing alone: not
# preceded by a letter, digit, underscore or point and not followed by a letter, digit, underscore or a point and a
# digit ("float32", "v6", "12px", "0x1f", "1.2.3" and "Step 1.1.1" keep their digits as text). "layer-13" is the
# word "layer-" and 13.
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.(\d+))?(?:[eE]([-+]?\d+))?(?!\w|\.\d)")
# Table padding: a run of two or more spaces (pandas puts at least two between columns) counts as any other such
# run; a single space stays a single space ("I  can't" against "I can't" is a change of text).
PADDING = re.compile(r"[ \t]{2,}")


def tokens(text: str) -> list[tuple[str, str]]:
    """``text`` as alternating ("text", ...) and ("number", ...) tokens (empty text between numbers kept, so that
    two strings with numbers in the same places give token lists of the same shape)."""
    out, position = [], 0
    for match in NUMBER.finditer(text):
        out.append(("text", text[position:match.start()]))
        out.append(("number", match.group()))
        position = match.end()
    out.append(("text", text[position:]))
    return out


def is_decimal(number: str) -> bool:
    """Whether a number token is printed with a decimal point or an exponent (compared with a tolerance)."""
    return "." in number or "e" in number.lower()


def last_digit_unit(number: str) -> Decimal:
    """One unit in the last printed digit of a decimal token: 0.01 for "7.33", 1e-07 for "1.5e-06", 1 for "2e0"."""
    match = NUMBER.fullmatch(number)
    if match is None:
        raise ValueError(f"{number!r} is not a number token")
    decimals = len(match.group(1) or "")
    exponent = int(match.group(2) or 0)
    return Decimal(1).scaleb(exponent - decimals)


def numbers_agree(stored: str, new: str) -> bool:
    """The rule for two number tokens (module docstring): integers identical; decimals within one unit in the last
    printed digit of the more precisely printed one; an integer never agrees with a decimal."""
    if is_decimal(stored) != is_decimal(new):
        return False
    if not is_decimal(stored):
        return stored == new
    tolerance = min(last_digit_unit(stored), last_digit_unit(new))
    return abs(Decimal(stored) - Decimal(new)) <= tolerance


def _excerpt(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def compare_text(stored: str, new: str) -> str | None:
    """None when ``new`` matches ``stored`` under the rule of the module docstring; otherwise a sentence naming
    the first difference beyond it."""
    stored_tokens, new_tokens = tokens(stored), tokens(new)
    for index, ((kind, a), (_, b)) in enumerate(zip(stored_tokens, new_tokens)):
        if kind == "text" and (a := PADDING.sub("  ", a)) != (b := PADDING.sub("  ", b)):
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return (f"text differs at token {index}: stored {_excerpt(a[at:])}, re-executed {_excerpt(b[at:])}")
        if kind == "number" and not numbers_agree(a, b):
            if not (is_decimal(a) or is_decimal(b)):
                return f"an integer differs: stored {a}, re-executed {b}"
            return f"a number differs beyond one unit in its last printed digit: stored {a}, re-executed {b}"
    if len(stored_tokens) != len(new_tokens):
        return (f"the outputs hold different counts of numbers ({len(stored_tokens) // 2} stored, "
                f"{len(new_tokens) // 2} re-executed)")
    return None


CHART_SPEC = re.compile(r"^ *var spec = (.*);$", re.MULTILINE)
CHART_ID = re.compile(r'<div id="([^"]+)"')
COLUMN_SCALE_FRACTION = 10.0 ** -SIGNIFICANT_DIGITS  # a thousandth of a column's largest magnitude
STEPS_ALLOWED = 2  # steps a stepped field (``lib.viz.in_steps``) may move: an example or two across a boundary


def is_chart(text: str) -> bool:
    """Whether an output is the HTML of a ``lib.viz`` chart (it embeds a Vega-Lite spec)."""
    return f'class="{CHART_CLASS}"' in text and CHART_SPEC.search(text) is not None


def chart_values_agree(stored: float, new: float, column_scale: float, step: float = 0.0) -> bool:
    """The chart-data rule (module docstring): within one unit in the ``SIGNIFICANT_DIGITS``-th significant digit
    of the larger magnitude, or within ``COLUMN_SCALE_FRACTION`` of the column's largest magnitude, or, for a field
    that moves in steps of ``step``, within ``STEPS_ALLOWED`` steps and that digit."""
    largest = max(abs(stored), abs(new))
    if largest == 0:
        return True
    digit_unit = 10.0 ** (math.floor(math.log10(largest)) - (SIGNIFICANT_DIGITS - 1))
    tolerance = max(digit_unit, COLUMN_SCALE_FRACTION * column_scale, STEPS_ALLOWED * step + digit_unit if step else 0)
    return abs(stored - new) <= tolerance * (1 + 1e-9)


def _series(row: dict) -> tuple:
    """The series a data row belongs to: its text fields (variant, measure, split, ...), which colour, facet or
    separate the marks; a column's scale is taken within one series, so that a melted column of refusal scores
    and KL values, or the variants of a facet, do not lend each other their magnitude."""
    return tuple(sorted((key, value) for key, value in row.items() if isinstance(value, str)))


def _compare_rows(stored: list, new: list, path: str, unstable: set[str], log_fields: set[str],
                  steps: dict[str, float]) -> str | None:
    """Data rows (a list of records) compared column by column: floats by ``chart_values_agree`` (with the
    column's scale within the row's series, and no scale at all for a field on a log axis, where every decade
    shows), the rest exactly."""
    if len(stored) != len(new):
        return f"{path} holds {len(stored)} rows stored, {len(new)} re-executed"
    series = [_series(row) for row in stored]
    scales: dict[tuple, float] = defaultdict(float)
    for row, line in zip(stored, series):
        for key, value in row.items():
            if isinstance(value, float) and math.isfinite(value) and key not in log_fields:
                scales[(line, key)] = max(scales[(line, key)], abs(value))
    for index, (a, b, line) in enumerate(zip(stored, new, series)):
        if a.keys() != b.keys():
            return f"{path}[{index}] has fields {sorted(a)} stored, {sorted(b)} re-executed"
        for key, value in a.items():
            if key in unstable:
                continue
            other = b[key]
            if isinstance(value, float) and isinstance(other, float) and math.isfinite(value) and math.isfinite(other):
                if not chart_values_agree(value, other, scales[(line, key)], steps.get(key, 0.0)):
                    return (f"{path}[{index}].{key} differs beyond the chart tolerance: stored {value}, "
                            f"re-executed {other}")
            elif type(value) is not type(other) or value != other:
                return f"{path}[{index}].{key} differs: stored {value!r}, re-executed {other!r}"
    return None


def log_scale_fields(spec) -> set[str]:
    """The fields that a spec encodes on a log scale (``{"field": F, "scale": {"type": "log"}}`` anywhere in it)."""
    found = set()
    if isinstance(spec, dict):
        if isinstance(spec.get("field"), str) and isinstance(spec.get("scale"), dict) \
                and spec["scale"].get("type") == "log":
            found.add(spec["field"])
        for value in spec.values():
            found |= log_scale_fields(value)
    elif isinstance(spec, list):
        for value in spec:
            found |= log_scale_fields(value)
    return found


def _compare_spec(stored, new, path: str, unstable: set[str], log_fields: set[str], steps: dict[str, float]
                  ) -> str | None:
    """Two parts of a Vega-Lite spec compared: data rows under ``values`` by ``_compare_rows``, the rest exactly."""
    if isinstance(stored, dict) and isinstance(new, dict):
        if stored.keys() != new.keys():
            return f"{path} has keys {sorted(stored)} stored, {sorted(new)} re-executed"
        for key in stored:
            rows = stored[key]
            if key == "values" and isinstance(rows, list) and all(isinstance(r, dict) for r in rows) \
                    and isinstance(new[key], list) and all(isinstance(r, dict) for r in new[key]):
                difference = _compare_rows(rows, new[key], f"{path}.values", unstable, log_fields, steps)
            else:
                difference = _compare_spec(rows, new[key], f"{path}.{key}", unstable, log_fields, steps)
            if difference:
                return difference
        return None
    if isinstance(stored, list) and isinstance(new, list):
        if len(stored) != len(new):
            return f"{path} holds {len(stored)} items stored, {len(new)} re-executed"
        for index, (a, b) in enumerate(zip(stored, new)):
            if difference := _compare_spec(a, b, f"{path}[{index}]", unstable, log_fields, steps):
                return difference
        return None
    if type(stored) is not type(new) or stored != new:
        return f"{path} differs: stored {stored!r}, re-executed {new!r}"
    return None


def compare_chart(stored: str, new: str) -> str | None:
    """None when two chart outputs match under the chart rule of the module docstring; otherwise a sentence
    naming the first difference beyond it."""
    stored_match, new_match = CHART_SPEC.search(stored), CHART_SPEC.search(new)
    if new_match is None:
        return "the re-executed output is not a chart"
    outside = [text[:match.start(1)] + text[match.end(1):] for text, match in ((stored, stored_match),
                                                                               (new, new_match))]
    # The element id is a hash of the spec, data included: it differs whenever a number does.
    outside = [text.replace(found.group(1), "CHART-ID") if (found := CHART_ID.search(text)) else text
               for text in outside]
    if outside[0] != outside[1]:
        return "the HTML around the chart spec differs"
    stored_spec, new_spec = json.loads(stored_match.group(1)), json.loads(new_match.group(1))
    meta = stored_spec.get("usermeta", {})
    unstable, steps = set(meta.get(UNSTABLE_FIELDS, [])), meta.get(FIELD_STEPS, {})
    return _compare_spec(stored_spec, new_spec, "spec", unstable, log_scale_fields(stored_spec), steps)


def compare_output(stored: str, new: str) -> str | None:
    """A chart by :func:`compare_chart`, anything else by :func:`compare_text`."""
    return compare_chart(stored, new) if is_chart(stored) else compare_text(stored, new)


def compared_fields(outputs, skip_compare) -> dict[str, list[tuple[dict, str]]]:
    """Where nbval finds each compared string of a cell's outputs, grouped by key in nbval's order: a stream's text
    under the stream's name, each MIME type's data under the MIME type (``IPyNbCell.compare_outputs``)."""
    fields = defaultdict(list)
    for output in outputs:
        if output.get("output_type") == "stream":
            if output.get("name") not in skip_compare:
                fields[output["name"]].append((output, "text"))
        elif "data" in output and "data" not in skip_compare:
            for mime, value in output["data"].items():
                if mime not in skip_compare and isinstance(value, str):
                    fields[mime].append((output["data"], mime))
    return fields


REPORT_ENV = "NBVAL_NUMBERS_REPORT"
_exact_compare_outputs = IPyNbCell.compare_outputs


HTML, PLAIN = "text/html", "text/plain"


def _plain_beside_html(key: str) -> str | None:
    """For a plain-text key (``text/plain``, ``application/papermill.record/text/plain``), the key of the HTML that
    the same output carries beside it; None for any other key."""
    return key[:-len(PLAIN)] + HTML if key.endswith(PLAIN) else None


def compare_outputs(self, test, ref, skip_compare=None):
    """nbval's ``IPyNbCell.compare_outputs`` after reconciling numbers: each re-executed string that matches its
    stored counterpart under :func:`compare_output` (after the sanitize rules) is replaced by the stored string.

    A plain-text fallback whose output also carries HTML that matches (a pandas table) matches too: pandas wraps
    its plain text at 80 columns, and a number that widens by one digit can move a column across the wrap; the HTML
    holds the same table without wrapping and is compared by the rule."""
    skip = skip_compare or self.parent.skip_compare
    new_fields, stored_fields = compared_fields(test, skip), compared_fields(ref, skip)
    html_agrees: set[tuple[int, str]] = set()  # (id of a re-executed output's data, HTML key) that matched
    first_difference = None
    for key in sorted(stored_fields, key=lambda k: _plain_beside_html(k) is not None):  # HTML before plain text
        stored_places, new_places = stored_fields[key], new_fields.get(key, [])
        if len(new_places) != len(stored_places):
            continue  # nbval reports the different number of outputs itself
        for (stored_owner, stored_key), (new_owner, new_key) in zip(stored_places, new_places):
            stored_text = self.sanitize(stored_owner[stored_key])
            new_text = self.sanitize(new_owner[new_key])
            difference = None if stored_text == new_text else compare_output(stored_text, new_text)
            if difference is not None and (id(new_owner), _plain_beside_html(key)) in html_agrees:
                difference = None
            if stored_text != new_text and os.environ.get(REPORT_ENV):
                with open(os.environ[REPORT_ENV], "a", encoding="utf-8") as report:
                    report.write(json.dumps({"cell": self.nodeid, "key": key, "stored": stored_text, "new": new_text,
                                             "difference": difference}) + "\n")
            if difference is None:
                new_owner[new_key] = stored_owner[stored_key]
                if key.endswith(HTML):
                    html_agrees.add((id(new_owner), key))
            elif first_difference is None:
                first_difference = f"{key}: {difference}"
    same = _exact_compare_outputs(self, test, ref, skip_compare)
    if not same and first_difference is not None:
        self.comparison_traceback.append(
            "Numbers are compared within one unit in their last printed digit (bookkit.nbval_numbers); "
            f"first difference beyond that: {first_difference}")
    return same


def pytest_configure(config):
    """Install the tolerant comparison into nbval's cell items."""
    IPyNbCell.compare_outputs = compare_outputs
