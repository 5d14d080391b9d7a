"""Install pinned packages into ``.venv`` with uv, configured as pip is, and with pip where uv is absent or fails.

Most of ``make setup``'s time with pip goes to compiling bytecode, which pip does one file at a time; uv installs
the same versions (``requirements.lock`` pins every one, and ``pip freeze`` lists the same packages either way) and
compiles on every core (see BENCHMARKS.md).
uv does not read pip's configuration, so where packages come from (index, extra indexes, local wheel folders,
constraint files: the files and ``PIP_*`` variables that ``pip config list`` shows) is handed to it as flags, with
pip's precedence (environment over the ``install`` section over ``global``) and pip's rule of taking the best
version across all indexes.

Command line (what the Makefile runs): ``python -m bookkit.install <pip install arguments>``; only the standard library is
used, since nothing else is installed yet.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# pip option -> uv flag, for the options that say where packages come from and which versions are allowed.
LIST_OPTIONS = {"extra-index-url": "--extra-index-url", "find-links": "--find-links", "constraint": "--constraint"}
SINGLE_OPTIONS = {"index-url": "--index-url"}
SECTIONS_BY_PRECEDENCE = (":env:", "install", "global")


def pip_settings(listing: str) -> dict[str, str]:
    """``pip config list``'s lines (``section.key='value'``) as ``{key: value}``, each key from the section pip
    itself would use for ``pip install``: the environment, then ``[install]``, then ``[global]``."""
    found: dict[tuple[str, str], str] = {}
    for line in listing.splitlines():
        name, sep, raw = line.partition("=")
        section, dot, key = name.strip().rpartition(".")
        if not (sep and dot):
            continue
        value = shlex.split(raw)
        found[(section, key)] = value[0] if value else ""
    settings = {}
    for key in sorted({k for _, k in found}):
        for section in SECTIONS_BY_PRECEDENCE:
            if (section, key) in found:
                settings[key] = found[(section, key)]
                break
    return settings


def uv_flags(settings: dict[str, str]) -> list[str]:
    """The ``uv pip install`` flags that make uv look where pip looks and allow what pip allows."""
    flags = ["--index-strategy", "unsafe-best-match"]  # pip's rule: the best version across every index
    for key, flag in SINGLE_OPTIONS.items():
        if settings.get(key):
            flags += [flag, settings[key]]
    for key, flag in LIST_OPTIONS.items():
        for value in settings.get(key, "").split():
            flags += [flag, value]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        flags.append("--no-index")
    return flags


def uv_environment(settings: dict[str, str]) -> dict[str, str]:
    """The process environment for uv: pip's certificate bundle and timeout under uv's names."""
    env = dict(os.environ)
    if settings.get("cert"):
        env.setdefault("SSL_CERT_FILE", settings["cert"])
    if settings.get("default-timeout"):
        env.setdefault("UV_HTTP_TIMEOUT", settings["default-timeout"])
    return env


def install(arguments: list[str], python: str = sys.executable) -> int:
    """``pip install --quiet <arguments>`` into ``python``'s environment, by uv where it is installed beside
    ``python`` and succeeds; the exit status of the install that ran last."""
    pip = [python, "-m", "pip"]
    uv = shutil.which("uv", path=str(Path(python).parent))
    if uv:
        listing = subprocess.run([*pip, "config", "list"], capture_output=True, text=True).stdout
        settings = pip_settings(listing)
        command = [uv, "pip", "install", "--quiet", "--python", python, "--compile-bytecode", *uv_flags(settings),
                   *arguments]
        if subprocess.run(command, env=uv_environment(settings)).returncode == 0:
            return 0
        print(f"bookkit.install: uv could not install {' '.join(arguments)}; installing with pip instead",
              file=sys.stderr)
    return subprocess.run([*pip, "install", "--quiet", *arguments]).returncode


if __name__ == "__main__":
    sys.exit(install(sys.argv[1:]))
