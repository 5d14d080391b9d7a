"""Chapter parameters, checked before a chapter computes anything.

papermill accepts any ``-p name value``: an unknown name only warns, a wrong type fails deep inside the chapter (for
example "'<=' not supported between 'int' and 'str'" for ``-p n_test abc``), and a string where a list belongs is
read character by character. Each chapter's first code cell calls ``check(globals(), "<chapter>")``, which fails
with one sentence naming the parameter and the fix. The rules are per parameter name, the same in every chapter;
the names a chapter accepts are those of its cell tagged ``parameters`` (read with papermill, so there is one
source).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import papermill

from bookkit.chapter_log import chapter_log, log_to_file
from bookkit.profiles import current_profile, profile_name, run_of
from lib.artifacts import REPO_ROOT
from lib.data import DATASETS
from lib.directions import LAYER_RULES
from lib.hooks import SITES
from lib.models import UnknownModelError, variants


BOOK = REPO_ROOT / "book"
KERNEL_NAMES = frozenset({"In", "Out", "get_ipython", "exit", "quit", "open"})  # IPython's own globals


class ParameterError(ValueError):
    """A chapter parameter has the wrong type or value, or the chapter does not declare it."""


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _list_of(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, (list, tuple)) and len(value) > 0 and all(test(v) for v in value)


def _optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or test(value)


def _one_of(choices) -> tuple[Callable[[Any], bool], str]:
    """A rule accepting exactly one of ``choices``, and its description, e.g. '"offline" or "paper"'."""
    return (lambda value: isinstance(value, str) and value in choices), " or ".join(f'"{name}"' for name in choices)


def _number(low: float, high: float) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, (int, float)) and not isinstance(value, bool) and low < value <= high


COUNT = (_count, "a whole number >= 1, e.g. 16")
OPTIONAL_COUNT = (_optional(_count), "a whole number >= 1, or None for all")
SEED = (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number, e.g. 42")
LAYER_LIST = (_optional(_list_of(_index)), "None (every layer) or a list of layer indices, e.g. [4, 8]")
VARIANT_NAMES = (_list_of(lambda v: isinstance(v, str)), "a list of variant names, e.g. [ssft, lat] (with -y)")

RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "family": (lambda v: isinstance(v, str) and bool(v), "a family name from lib/families.yaml"),
    "variants": (lambda v: v == "available" or VARIANT_NAMES[0](v), '"available" or ' + VARIANT_NAMES[1]),
    "sources": VARIANT_NAMES, "sweep_variants": VARIANT_NAMES,
    "target": (lambda v: isinstance(v, str) and bool(v), "one variant name, e.g. ssft"),
    "families": (lambda v: v == "all" or _list_of(lambda x: isinstance(x, str))(v),
                 '"all" or a list of family names (with -y)'),
    "runs": (_optional(_list_of(lambda x: isinstance(x, str) and bool(x))),
             "None (the run of the profile the chapter runs under) or a list of run names, e.g. [default, llama2-7b]"),
    "dataset": _one_of(DATASETS),
    "layer_rule": _one_of(LAYER_RULES),
    "device": (lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None,
               '"auto", "cpu" or "cuda[:i]"'),
    "dtype": (lambda v: v in ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
              '"auto", "float32", "bfloat16" or "float16"'),
    "retrain": (lambda v: isinstance(v, bool), "True or False"),
    "seed": SEED,
    "n_test": OPTIONAL_COUNT, "n_pairs": OPTIONAL_COUNT, "n_side": OPTIONAL_COUNT,
    **{name: COUNT for name in ("paper_pairs", "n_val", "n_reference", "n_score", "n_generate", "n_length",
                                "attack_prompts", "attack_steps", "attack_tokens", "max_new_tokens", "batch_size",
                                "score_batch_size", "n_boot", "n_boot_layers", "top", "sweep_stride",
                                "probe_stride", "n_examples")},
    "layers": LAYER_LIST, "pca_layers": LAYER_LIST,
    "layer": (_optional(_index), "None (the paper's relative layer) or a layer index, e.g. 13"),
    "sites": (_list_of(lambda v: v in SITES), f"a list of sites from {', '.join(SITES)}"),
    "position": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a prompt position, e.g. -1 (the last)"),
    "ks": (_list_of(_count), "a list of subspace dimensions, e.g. [1, 2, 3]"),
    "max_kl": (_number(0, float("inf")), "a positive number, e.g. 0.1"),
    "max_depth": (_number(0, 1), "a fraction of the depth in (0, 1], e.g. 0.8"),
    "gold_file": (lambda v: isinstance(v, str) and (REPO_ROOT / v).is_file(),
                  "the path of an existing gold file relative to the repository, e.g. data/judge_gold.jsonl"),
}
FAMILY_VARIANTS = ("variants", "sources", "sweep_variants", "target")  # must name variants of the chapter's family


def declared_in(notebook: str | Path) -> dict[str, dict]:
    """Parameters declared in a notebook's cell tagged ``parameters`` (name -> papermill's description)."""
    return papermill.inspect_notebook(str(notebook))


@functools.lru_cache(maxsize=None)
def declared(chapter: str) -> tuple[str, ...]:
    """The parameter names of ``book/<chapter>.ipynb``'s cell tagged ``parameters``."""
    path = BOOK / f"{chapter}.ipynb"
    if not path.exists():
        raise ParameterError(f"No chapter {chapter!r}: {path} does not exist.")
    return tuple(declared_in(path))


def given(namespace: dict[str, Any]) -> dict[str, Any]:
    """The variables a chapter's namespace holds before its first code cell: its parameters (and any papermill
    injected), without IPython's own names."""
    return {name: value for name, value in namespace.items()
            if not name.startswith("_") and name not in KERNEL_NAMES and not callable(value)
            and type(value).__name__ != "module"}


def validate(values: dict[str, Any], chapter: str, names: tuple[str, ...] | None = None) -> None:
    """Raise ``ParameterError`` (one sentence: the parameter, what it got, what it needs) unless every name in
    ``values`` is a parameter the chapter declares, with an allowed value. ``chapter``: the notebook's stem;
    ``names``: its declared parameters (default: read from ``book/<chapter>.ipynb``)."""
    names = names if names is not None else declared(chapter)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ParameterError(f"{chapter} has no parameter(s) {unknown}; it takes {sorted(names)} (check the "
                             "spelling of -p/-y, or the profile).")
    for name in names:
        if name not in values or name not in RULES:
            continue
        test, expected = RULES[name]
        if not test(values[name]):
            raise ParameterError(f"Parameter {name} = {values[name]!r} ({type(values[name]).__name__}) is not "
                                 f"allowed: {name} must be {expected}.")
    _check_family(values)


def check(namespace: dict[str, Any], chapter: str) -> str:
    """A chapter's first call: send its warnings and library log lines to ``chapter_log(chapter)`` (not to the
    notebook's stderr), ``validate`` its parameters (the variables of ``namespace``), then return the run its results
    belong to (``bookkit.profiles.run_of``): the profile's name when the parameters are that profile's, else an
    ``adhoc-...`` run of their own, announced in one printed line so the reader knows where they went."""
    log_to_file(chapter_log(chapter))
    values = given(namespace)
    validate(values, chapter)
    run, differ = run_of(values, f"book/{chapter}", declared_in(BOOK / f"{chapter}.ipynb"))
    if differ:
        changed = ", ".join(f"{name}={mine!r} (profile: {theirs!r})" for name, (theirs, mine) in differ.items())
        print(f"Parameters not those of profile {profile_name(current_profile())!r} ({changed}): results are stored "
              f"as run {run!r}; the conclusions chapter reads them with -y 'runs: [{run}]'.")
    return run


def _check_family(values: dict[str, Any]) -> None:
    if "family" not in values:
        return
    try:
        known = variants(values["family"])
    except UnknownModelError as error:
        raise ParameterError(f"Parameter family: {error}") from error
    for name in FAMILY_VARIANTS:
        value = values.get(name)
        if value is None or value == "available":
            continue
        missing = [v for v in ([value] if isinstance(value, str) else value) if v not in known]
        if missing:
            raise ParameterError(f"Parameter {name} names {missing}, which {values['family']!r} does not have; "
                                 f"its variants are {known}.")
