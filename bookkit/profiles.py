"""Profiles: which parameters each chapter runs with, and the run its results belong to.

A profile is a YAML file (``params/default.yaml`` is the book's own; ``params/llama2-7b.yaml`` the paper's models)::

    description: free text (optional)
    skip: [book/01_organisms]   # chapters this profile does not run (optional)
    defaults:            # applied to every chapter whose `parameters` cell declares the name
      seed: 0
    chapters:            # per-chapter overrides; keys are notebook paths without suffix, relative to the repo root
      book/02_activations:
        n_pairs: 64

A profile's name (its file's stem) names the *run*: the chapters it executes store their verdicts under that name,
and the conclusions chapter reads one run's verdicts. A chapter executed with other parameters than its profile's
(an exploratory ``papermill -p n_test 2``) belongs to a run of its own, ``adhoc-<hash of chapter and parameters>``,
so it can never replace the book's verdicts.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

import yaml

from lib.artifacts import REPO_ROOT, sha256_text


PROFILE_ENV = "REFUSAL_BOOK_PROFILE"  # set by bookkit.runner for the kernels it starts: the profile they run under
BOOK_PROFILE = REPO_ROOT / "params" / "default.yaml"  # the book's own profile (committed chapters, `make book`)
PROFILE_KEYS = {"description", "defaults", "chapters", "skip"}


class ProfileError(ValueError):
    """The profile is malformed or does not match the chapters' declared parameters."""


def load_profile(path: str | Path) -> dict:
    """Read a profile and check its shape (``description``, ``defaults``, ``chapters``, ``skip``)."""
    path = Path(path)
    try:
        profile = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f", line {where.line + 1}" if where is not None else ""
        raise ProfileError(f"{path}{line}: not valid YAML ({getattr(error, 'problem', None) or error}); "
                           "fix the file (params/default.yaml shows the expected layout).") from error
    if not isinstance(profile, dict):
        raise ProfileError(f"{path}: a profile must be a mapping with keys {sorted(PROFILE_KEYS)}")
    unknown = sorted(set(profile) - PROFILE_KEYS)
    if unknown:
        raise ProfileError(f"{path}: unknown top-level key(s) {unknown}; allowed: {sorted(PROFILE_KEYS)}")
    defaults = profile.get("defaults") or {}
    chapters = profile.get("chapters") or {}
    if not isinstance(defaults, dict):
        raise ProfileError(f"{path}: 'defaults' must be a mapping of parameter -> value")
    if not isinstance(chapters, dict) or not all(isinstance(v, dict) or v is None for v in chapters.values()):
        raise ProfileError(f"{path}: 'chapters' must map chapter keys (e.g. book/02_activations) to mappings")
    skip = profile.get("skip") or []
    if not isinstance(skip, list) or not all(isinstance(k, str) for k in skip):
        raise ProfileError(f"{path}: 'skip' must be a list of chapter keys (e.g. book/01_organisms)")
    return {"defaults": defaults, "chapters": {str(k): (v or {}) for k, v in chapters.items()}, "skip": skip}


def profile_name(path: str | Path) -> str:
    """A profile's run name: its file's stem (``params/llama2-7b.yaml`` -> ``llama2-7b``)."""
    return Path(path).stem


def current_profile() -> Path:
    """The profile a chapter runs under: the runner's (``$REFUSAL_BOOK_PROFILE``), else the book's own."""
    return Path(os.environ.get(PROFILE_ENV) or BOOK_PROFILE)


def chapter_parameters(profile: dict, key: str, declared: dict[str, dict]) -> dict | None:
    """What the runner passes to chapter ``key`` (e.g. ``book/06_transfer``) under ``profile``: the defaults the
    chapter declares, then its own overrides. None when the profile skips the chapter."""
    if key in profile["skip"]:
        return None
    params = {name: value for name, value in profile["defaults"].items() if name in declared}
    params.update(profile["chapters"].get(key, {}))
    return params


def effective_parameters(params: dict, declared: dict[str, dict]) -> dict:
    """What a chapter will run with: its parameters cell's defaults (papermill's source text, evaluated as a
    literal) overridden by ``params``."""
    values = {}
    for name, spec in declared.items():
        try:
            values[name] = ast.literal_eval(spec["default"])
        except (ValueError, SyntaxError):
            continue  # a default computed by code: left to the chapter's own check
    return {**values, **params}


def run_of(values: dict[str, Any], key: str, declared: dict[str, dict], profile_path: str | Path | None = None
           ) -> tuple[str, dict[str, tuple[Any, Any]]]:
    """The run a chapter executed with parameter ``values`` belongs to, and how its values differ from the profile's
    (name -> (profile's value, this run's value); empty when they agree). The run is the profile's name when every
    value is the profile's for this chapter, else ``adhoc-<8 hex digits>`` (a hash of the chapter and its values)."""
    path = Path(profile_path) if profile_path is not None else current_profile()
    params = chapter_parameters(load_profile(path), key, declared)
    expected = effective_parameters(params or {}, declared)
    differ = {name: (value, values.get(name)) for name, value in expected.items() if values.get(name) != value}
    if params is not None and not differ:
        return profile_name(path), {}
    digest = sha256_text(json.dumps([key, sorted(values.items())], default=repr))[:8]
    return f"adhoc-{digest}", differ
