"""bookkit.parameters: every chapter's own defaults pass, and each bad value a user could pass with papermill fails with
one sentence naming the parameter."""

import nbformat
import pytest

from bookkit import parameters
from bookkit.chapter_log import chapter_log
from bookkit.parameters import ParameterError

CHAPTERS = sorted(p.stem for p in parameters.BOOK.glob("0*.ipynb"))


@pytest.fixture(autouse=True)
def chapter_logs(monkeypatch):
    """The chapter logs ``check`` opens (``bookkit.chapter_log.log_to_file``), recorded instead of rerouting this
    process's logging (tests/bookkit/test_chapter_log.py and tests/bookkit/test_chapter_stderr.py test the rerouting itself)."""
    opened = []
    monkeypatch.setattr(parameters, "log_to_file", opened.append)
    return opened


def defaults(chapter):
    """The chapter's parameters cell, executed: what papermill starts from."""
    nb = nbformat.read(parameters.BOOK / f"{chapter}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    namespace = {}
    exec(cell.source, namespace)  # noqa: S102 (the book's own cell)
    return {k: v for k, v in namespace.items() if k != "__builtins__"}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_checks_its_parameters_first_and_its_defaults_pass(chapter, chapter_logs):
    nb = nbformat.read(parameters.BOOK / f"{chapter}.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])
                 and "injected-parameters" not in c.metadata.get("tags", []))
    assert f'run = check(globals(), "{chapter}")' in first.source or f'check(globals(), "{chapter}")' in first.source
    assert parameters.check({**defaults(chapter), "In": [], "_": None, "pd": parameters}, chapter) == "default"
    assert chapter_logs == [chapter_log(chapter)]  # its warnings go to artifacts/logs/<chapter>.log


@pytest.mark.parametrize("chapter, change, message", [
    ("06_transfer", {"nope": 1}, r"06_transfer has no parameter\(s\) \['nope'\]; it takes"),
    ("06_transfer", {"n_test": "abc"}, r"n_test = 'abc' \(str\) is not allowed: n_test must be a whole number"),
    ("06_transfer", {"n_test": 0}, "n_test must be a whole number >= 1"),
    ("06_transfer", {"variants": "ssft"}, r"variants = 'ssft' \(str\).*a list of variant names"),
    ("06_transfer", {"sources": ["ssft", "nope"]}, r"sources names \['nope'\].*variants are \['base', 'ssft'"),
    ("06_transfer", {"family": "gpt-9"}, "Parameter family: Unknown model family 'gpt-9'"),
    ("06_transfer", {"device": "gpu"}, r"device must be \"auto\", \"cpu\""),
    ("06_transfer", {"dataset": "advbench"}, r"dataset must be \"offline\" or \"paper\""),
    ("06_transfer", {"dataset": ["paper"]}, r"dataset must be \"offline\" or \"paper\""),
    ("07_beyond", {"layer_rule": "best"}, r"layer_rule must be \"chosen\" or \"paper\""),
    ("02_activations", {"layers": [1.7]}, "layers must be None"),
    ("02_activations", {"sites": ["resid_final"]}, "sites must be a list of sites"),
    ("07_beyond", {"ks": []}, "ks must be a list of subspace dimensions"),
    ("01_organisms", {"retrain": "yes"}, "retrain must be True or False"),
    ("08_judge_audit", {"gold_file": "data/missing.jsonl"}, "gold_file must be the path of an existing gold file"),
    ("09_conclusions", {"families": 3}, "families must be \"all\" or a list"),
])
def test_bad_parameters_fail_with_one_sentence(chapter, change, message):
    with pytest.raises(ParameterError, match=message):
        parameters.check({**defaults(chapter), **change}, chapter)


def test_notebook_defaults_equal_the_default_profile():
    """One source per setting: a reader of a chapter sees, in its parameters cell, the values `make book` ran."""
    from bookkit import chapters, runner

    plan = chapters.plan_runs(runner.load_profile(parameters.REPO_ROOT / "params" / "default.yaml"),
                              chapters.read_toc_notebooks(parameters.REPO_ROOT), parameters.REPO_ROOT)
    drift = {f"{nb.stem}: {name}": (defaults(nb.stem)[name], value)
             for nb, params in plan for name, value in params.items() if defaults(nb.stem)[name] != value}
    assert not drift, f"parameters cell default != params/default.yaml: {drift}"


def test_a_chapter_run_with_other_parameters_is_a_run_of_its_own(monkeypatch, capsys):
    """An exploratory papermill run (-p n_test 2) never stores its results as the book's run; the same parameters
    give the same run name, other ones another; under the runner's profile the run is that profile's."""
    monkeypatch.delenv("REFUSAL_BOOK_PROFILE", raising=False)
    values = {**defaults("06_transfer"), "n_test": 2}
    run = parameters.check(values, "06_transfer")
    assert run.startswith("adhoc-") and len(run) == len("adhoc-") + 8
    assert "n_test=2 (profile: 64)" in capsys.readouterr().out
    assert parameters.check(dict(values), "06_transfer") == run
    assert parameters.check({**values, "n_test": 3}, "06_transfer") != run
    assert parameters.check({**values, "n_test": 64}, "06_transfer") == "default"
    assert capsys.readouterr().out.count("results are stored as run") == 2
    llama = parameters.REPO_ROOT / "params" / "llama2-7b.yaml"
    monkeypatch.setenv("REFUSAL_BOOK_PROFILE", str(llama))
    from bookkit import chapters, profiles

    plan = chapters.plan_runs(profiles.load_profile(llama), chapters.read_toc_notebooks(parameters.REPO_ROOT),
                              parameters.REPO_ROOT)
    params = dict((nb.stem, p) for nb, p in plan)["06_transfer"]
    assert parameters.check({**defaults("06_transfer"), **params}, "06_transfer") == "llama2-7b"
    assert parameters.check(defaults("09_conclusions"), "09_conclusions") == "llama2-7b"
    assert parameters.check(defaults("06_transfer"), "06_transfer").startswith("adhoc-")
