"""Publishing infrastructure: the offline altair renderer, the Vega bundle, the chapter runner, nbval sanitizing."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from bookkit import chapters, parameters, runner, site_assets
from lib import viz

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------------------------
# Charts and renderer
# --------------------------------------------------------------------------------------------------------------------


def _norms(offset: float = 0.0) -> pd.DataFrame:
    rows = [{"variant": v, "layer": layer, "split": s, "mean_norm": 1.234567 * layer + offset + (s == "harmful")}
            for v in ("ssft", "lat") for s in ("harmful", "harmless") for layer in range(4)]
    return pd.DataFrame(rows)


def _pca(variants=("ssft",)) -> pd.DataFrame:
    rows = [{"variant": v, "layer": layer, "kind": k, "pc1": 0.1 * i - 0.123456789, "pc2": 1.0 / (i + 1)}
            for v in variants for layer in (1, 4) for k in viz.KIND_ORDER for i in range(3)]
    return pd.DataFrame(rows)


def test_renderer_html_is_stable_and_offline(offline_renderer):
    html = viz.layer_norms_chart(_norms())._repr_mimebundle_()["text/html"]
    again = viz.layer_norms_chart(_norms().sample(frac=1.0, random_state=0))._repr_mimebundle_()["text/html"]
    assert html == again == viz.chart_html(viz.layer_norms_chart(_norms()))
    div_id = re.search(r'<div id="(vl-[0-9a-f]{16})"', html).group(1)
    assert f'vegaEmbed("#{div_id}", spec, {{"actions": false, "renderer": "svg"}})' in html
    assert not re.search(r"<script[^>]*\bsrc=", html), "the chart must not load any script"
    assert "</script>" not in html.split("<script", 1)[1][:-len("</script>")], "spec must be escaped"


def test_different_charts_get_different_ids():
    ids = {re.search(r'id="(vl-[0-9a-f]+)"', viz.chart_html(chart)).group(1)
           for chart in (viz.layer_norms_chart(_norms()), viz.layer_norms_chart(_norms(offset=1.0)),
                         viz.pca_scatter_chart(_pca()), viz.pca_scatter_chart(_pca(("ssft", "lat"))))}
    assert len(ids) == 4


def test_charts_round_to_three_significant_digits_inline_their_data_and_check_columns(offline_renderer):
    spec = viz.pca_scatter_chart(_pca()).to_dict()
    assert "datasets" not in spec, "data stay inline: no dataset named by a hash of its content"
    values = spec["data"]["values"]
    assert {row["pc1"] for row in values} >= {-0.123, -0.0235}
    assert spec["facet"]["field"] == "layer" and spec["columns"] == 4
    assert "row" in viz.pca_scatter_chart(_pca(("ssft", "lat"))).to_dict()["facet"]
    with pytest.raises(ValueError, match="mean_norm"):
        viz.layer_norms_chart(_norms().drop(columns="mean_norm"))


def test_write_vega_bundle_writes_once(tmp_path):
    static = tmp_path / "_static"
    assert site_assets.write_vega_bundle(static) is True
    bundle = static / viz.BUNDLE_NAME
    stamp = bundle.stat().st_mtime_ns
    assert "window.vegaEmbed=" in bundle.read_text(encoding="utf-8")
    assert site_assets.write_vega_bundle(static) is False
    assert bundle.stat().st_mtime_ns == stamp


def test_write_mathjax_copies_the_component_and_its_fonts_once(tmp_path):
    assert site_assets.write_mathjax(tmp_path) is True
    script = tmp_path / "mathjax" / "tex-chtml.js"
    assert "MathJax" in script.read_text(encoding="utf-8")
    fonts = list((tmp_path / "mathjax" / "output/chtml/fonts/woff-v2").iterdir())
    assert len(fonts) > 10 and all(font.suffix == ".woff" for font in fonts)
    stamp = script.stat().st_mtime_ns
    assert site_assets.write_mathjax(tmp_path) is False and script.stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------------------------


def _book(tmp_path: Path, cells: list) -> Path:
    """A minimal book: _toc.yml with a Markdown root and one chapter notebook in book/."""
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# Intro\n", encoding="utf-8")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/ch\n",
                                       encoding="utf-8")
    nb = new_notebook(cells=[new_markdown_cell("# Chapter")] + cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "book" / "ch.ipynb")
    return tmp_path / "book" / "ch.ipynb"


def _parameters_cell(source: str = "x = 1\nlabel = 'a'"):
    cell = new_code_cell(source)
    cell.metadata["tags"] = ["parameters"]
    return cell


def _profile(tmp_path: Path, text: str, name: str = "default") -> Path:
    """A profile of the book at ``tmp_path``: ``params/default.yaml`` is the book's own (executed in place)."""
    path = tmp_path / "params" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_read_toc_notebooks_skips_markdown(tmp_path):
    notebook = _book(tmp_path, [_parameters_cell()])
    assert chapters.read_toc_notebooks(tmp_path) == [notebook]


def test_runner_rejects_unknown_parameters(tmp_path):
    _book(tmp_path, [_parameters_cell()])
    profile = _profile(tmp_path, "chapters:\n  book/ch:\n    x: 2\n    nope: 3\n")
    with pytest.raises(runner.ProfileError, match=r"ch\.ipynb.*'nope'.*declares: \['label', 'x'\]"):
        runner.run_profile(profile, repo_root=tmp_path)
    with pytest.raises(runner.ProfileError, match="'missing'"):
        runner.run_profile(_profile(tmp_path, "defaults:\n  missing: 1\n"), repo_root=tmp_path)
    with pytest.raises(runner.ProfileError, match="book/other"):
        runner.run_profile(_profile(tmp_path, "chapters:\n  book/other: {x: 1}\n"), repo_root=tmp_path)


def test_malformed_profile_yaml_is_one_line_naming_the_file(tmp_path, capsys):
    _book(tmp_path, [_parameters_cell()])
    profile = _profile(tmp_path, "chapters:\n  book/ch: {x: 2\n  other: [\n")
    assert runner.main(["--profile", str(profile), "--root", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {profile}, line ") and "not valid YAML" in error and "Traceback" not in error


def test_strip_volatile_metadata():
    nb = new_notebook(cells=[new_code_cell("1"), new_code_cell("x = 2")])
    nb.metadata["papermill"] = {"duration": 1.5, "start_time": "2026-01-01", "parameters": {"x": 2}}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    nb.cells[0].metadata.update(papermill={"duration": 0.1, "exception": False, "status": "completed"},
                                execution={"iopub.execute_input": "2026-01-01T00:00:00"}, tags=[])
    nb.cells[1].metadata["tags"] = ["injected-parameters"]
    runner.hide_injected_parameters(runner.strip_volatile_metadata(nb))
    assert "papermill" not in nb.metadata and "widgets" not in nb.metadata
    assert dict(nb.cells[0].metadata) == {}
    assert nb.cells[1].id == "injected-parameters"
    assert nb.cells[1].metadata["tags"] == ["injected-parameters", "hide-cell"]


def test_runner_executes_in_place(tmp_path, capsys):
    notebook = _book(tmp_path, [
        _parameters_cell(),
        new_code_cell("import os\nfrom pathlib import Path\n"
                      "print(x * 2, label, os.environ['REFUSAL_BOOK_PROGRESS'], Path.cwd().name)"),
        new_code_cell("import time\ntime.sleep(1.2)"),
    ])
    notebook.chmod(0o644)
    runner.run_profile(_profile(tmp_path, "defaults:\n  x: 21\nchapters:\n  book/ch:\n    label: b\n"),
                       repo_root=tmp_path)
    assert notebook.stat().st_mode & 0o777 == 0o644
    assert re.search(r"book/ch: done in \d+\.\d s; slowest cell 4: \d+ s \(import time\)\n", capsys.readouterr().out)
    nb = nbformat.read(notebook, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "hide-cell" in injected[0].metadata["tags"]
    assert "x = 21" in injected[0].source and injected[0].id == "injected-parameters"
    assert nb.cells[-2].outputs[0]["text"] == "42 b 0 book\n"
    assert "papermill" not in nb.metadata
    assert not any("papermill" in c.metadata or "execution" in c.metadata for c in nb.cells)
    assert sorted(p.name for p in notebook.parent.iterdir()) == ["ch.ipynb", "intro.md"]


def test_a_line_written_in_two_flushes_is_stored_as_one_output(tmp_path):
    """ipykernel flushes stdout on a timer; a line whose two halves straddle a flush must not become two outputs
    (the stored chapter would differ from run to run)."""
    notebook = _book(tmp_path, [new_code_cell(
        "import sys, time\nsys.stdout.write('one line'); sys.stdout.flush(); time.sleep(0.5); print(' of text')")])
    runner.run_profile(_profile(tmp_path, "defaults: {}\n"), repo_root=tmp_path)
    outputs = nbformat.read(notebook, as_version=4).cells[-1].outputs
    assert [(o.output_type, o.name, o.text) for o in outputs] == [("stream", "stdout", "one line of text\n")]


def test_runner_names_a_chapter_log_that_is_not_empty(tmp_path, monkeypatch, capsys):
    """A chapter's warnings go to its log, not its stderr (bookkit.chapter_log); the runner says where."""
    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path / "artifacts"))
    notebook = _book(tmp_path, [_parameters_cell(), new_code_cell(
        "import warnings\nfrom bookkit.chapter_log import chapter_log, log_to_file\n"
        "log_to_file(chapter_log('ch'))\nwarnings.warn('probe')")])
    runner.run_profile(_profile(tmp_path, "defaults:\n  x: 1\n"), repo_root=tmp_path)
    log = tmp_path / "artifacts" / "logs" / "ch.log"
    assert re.search(rf"book/ch: \d+ line\(s\) of warnings or library logs in {re.escape(str(log))}\n", capsys.readouterr().out)
    assert "UserWarning: probe" in log.read_text()
    assert not any(o.get("name") == "stderr" for c in nbformat.read(notebook, as_version=4).cells for o in c.get("outputs", []))


def test_another_profile_writes_its_own_folder_and_names_its_run(tmp_path, monkeypatch, capsys):
    """A profile other than the book's never touches the committed chapters; its kernels know their profile."""
    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path / "artifacts"))
    notebook = _book(tmp_path, [_parameters_cell(), new_code_cell(
        "import os\nprint(x, os.path.basename(os.environ['REFUSAL_BOOK_PROFILE']))")])
    before = notebook.read_bytes()
    runner.run_profile(_profile(tmp_path, "defaults:\n  x: 5\n", "gpu-run"), repo_root=tmp_path)
    assert notebook.read_bytes() == before
    assert "run 'gpu-run': executed chapters go to " in capsys.readouterr().out
    written = tmp_path / "artifacts" / "runs" / "gpu-run" / "book" / "ch.ipynb"
    assert nbformat.read(written, as_version=4).cells[-1].outputs[0]["text"] == "5 gpu-run.yaml\n"
    runner.run_profile(_profile(tmp_path, "defaults:\n  x: 6\n", "gpu-run"), repo_root=tmp_path, in_place=True)
    assert nbformat.read(notebook, as_version=4).cells[-1].outputs[0]["text"] == "6 gpu-run.yaml\n"


def test_failing_chapter_leaves_notebook_untouched(tmp_path):
    notebook = _book(tmp_path, [_parameters_cell(), new_code_cell("raise ValueError('boom')")])
    before = notebook.read_bytes()
    with pytest.raises(runner.ChapterError, match=r"book/ch[\s\S]*boom"):
        runner.run_profile(_profile(tmp_path, "defaults:\n  x: 3\n"), repo_root=tmp_path)
    assert notebook.read_bytes() == before
    assert sorted(p.name for p in notebook.parent.iterdir()) == ["ch.ipynb", "intro.md"]


# --------------------------------------------------------------------------------------------------------------------
# nbval sanitize rules
# --------------------------------------------------------------------------------------------------------------------


def test_nbval_sanitize_rules_parse_and_apply():
    from nbval.plugin import get_sanitize_patterns

    patterns = get_sanitize_patterns((REPO_ROOT / "tests" / "nbval_sanitize.cfg").read_text(encoding="utf-8"))
    assert len(patterns) == 4

    def sanitize(text: str) -> str:
        for regex, replace in patterns:
            text = re.sub(regex, replace, text)
        return text

    assert sanitize("<A at 0x7f3a2c1b5e50>") == sanitize("<A at 0x55d0aa001234>")
    assert sanitize("/work/main/artifacts/a.json") == sanitize("/tmp/ci/clone/artifacts/a.json")
    assert sanitize("took 12.3 s") == sanitize("took 9.8 s")
    assert sanitize("100s of prompts, layer 14, 0.4885") == "100s of prompts, layer 14, 0.4885"
    # Charts: only the id (a hash of the spec) is masked; their numbers are left to bookkit.nbval_numbers.
    chart = '<div id="vl-{}"></div> {{"values":[{{"low":{},"variant":"ssft"}}],"width":176}}'
    assert sanitize(chart.format("f4143ba1f25e244b", "0.251")) == sanitize(chart.format("cd46130ed2b665e7", "0.251"))
    assert sanitize(chart.format("f4143ba1f25e244b", "0.251")) != sanitize(chart.format("f4143ba1f25e244b", "0.252"))
    # Outside chart specs numbers are left as printed too: printed lines, tables, Python reprs.
    assert sanitize("<td>0.2514</td> {'low': 0.2514}") == "<td>0.2514</td> {'low': 0.2514}"


# --------------------------------------------------------------------------------------------------------------------
# The "Re-run it" page
# --------------------------------------------------------------------------------------------------------------------

RERUN_PAGE = REPO_ROOT / "book" / "rerun.md"


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


MAX_CELL_LINES = 12


def test_chapter_code_cells_are_short():
    """Chapters are prose with short code cells that call lib: every code cell but the parameters cells holds at
    most MAX_CELL_LINES non-blank lines."""
    long = []
    for path in sorted((REPO_ROOT / "book").glob("*.ipynb")):
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type != "code" or {"parameters", "injected-parameters"} & set(cell.metadata.get("tags", [])):
                continue
            lines = [line for line in cell.source.splitlines() if line.strip()]
            if len(lines) > MAX_CELL_LINES:
                long.append(f"{path.name} cell {index}: {len(lines)} lines")
    assert not long, f"Code cells over {MAX_CELL_LINES} lines; move their code into a named lib helper: {long}"


def test_chapter_code_compiles():
    """A syntax error in a chapter fails here in a second, not after the chapters before it have run under nbval."""
    for path in sorted((REPO_ROOT / "book").glob("*.ipynb")):
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code":
                compile(cell.source, f"{path.name} cell {index}", "exec")


def test_rerun_page_comes_last_before_references():
    import yaml

    chapters = [entry["file"] for entry in yaml.safe_load((REPO_ROOT / "_toc.yml").read_text())["chapters"]]
    assert chapters[-2:] == ["book/rerun", "book/references"]


def test_rerun_page_examples_match_the_code(monkeypatch, tmp_path, capsys):
    """The page's family YAML registers, the profiles it names validate against the chapters, its runner flags
    exist."""
    import yaml

    from lib import models

    text = RERUN_PAGE.read_text(encoding="utf-8")
    blocks = _code_blocks(text, "yaml")
    family = yaml.safe_load(next(block for block in blocks if "variants:" in block))
    monkeypatch.setattr(models, "_FAMILIES", dict(models.families()))  # the new family must not leak into other tests
    (name,) = models.register_families(family)
    assert models.variants(name) and "hub" in models.family_spec(name)["base"]

    profiles = set(re.findall(r"params/[\w.-]+\.yaml", text))
    assert "params/llama2-7b.yaml" in profiles
    for profile in profiles:
        plan = chapters.plan_runs(runner.load_profile(REPO_ROOT / profile), chapters.read_toc_notebooks(REPO_ROOT),
                                  REPO_ROOT)
        assert plan, profile

    for block in _code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("papermill "):
                notebook = REPO_ROOT / line.split()[1]
                names = set(re.findall(r"-p (\w+)", line))
                names |= {key for value in re.findall(r'-y "([^"]+)"', line) for key in yaml.safe_load(value)}
                assert names <= set(parameters.declared_in(notebook)), (line, sorted(names))

    with pytest.raises(SystemExit):
        runner.main(["--help"])
    known = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    used = {flag for block in _code_blocks(text, "bash") for line in block.splitlines() if "bookkit.runner" in line
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line)}
    assert used and used <= known, f"the page uses runner flags {sorted(used - known)} that bookkit.runner lacks"


def test_bibliography_labels_are_author_year():
    import importlib.util

    from pybtex.database import parse_file, parse_string
    from pybtex.plugin import find_plugin

    spec = importlib.util.spec_from_file_location("bibliography_style", REPO_ROOT / "book" / "_ext" / "bibliography_style.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    style = find_plugin("pybtex.style.formatting", "author_year_list")()
    labels = [entry.label for entry in style.format_entries(parse_file(REPO_ROOT / "book" / "references.bib").entries.values())]
    assert "Abbas et al. 2025" in labels and "Ben Allal et al. 2025" in labels
    twins = parse_string("@misc{a, author={Doe, Jane}, year={2020}, title={A}}\n"
                         "@misc{b, author={Doe, Jane}, year={2020}, title={B}}\n"
                         "@misc{c, author={Roe, R. and Poe, P.}, year={2021}, title={C}}", "bibtex")
    assert [e.label for e in style.format_entries(twins.entries.values())] == ["Doe 2020a", "Doe 2020b",
                                                                                  "Roe and Poe 2021"]
    assert "bibliography_style" in (REPO_ROOT / "_config.yml").read_text()


@pytest.mark.parametrize("text, message", [
    ("defaults: {family: llama2-7b, dataset: paper}\nskip: [book/01_organisms, book/08_judge_audit]\n",
     r"book/04_directions would run with a bad parameter: Parameter sweep_variants names \['ssft-control'\]"),
    ("chapters:\n  book/06_transfer: {dataset: paper}\n", r"different datasets .*'book/06_transfer': 'paper'"),
    ("chapters:\n  book/06_transfer: {n_test: abc}\n", r"book/06_transfer would run with a bad parameter: "
                                                        r"Parameter n_test = 'abc'.*Set it in the profile"),
])
def test_profiles_are_checked_before_any_chapter_runs(tmp_path, text, message):
    with pytest.raises(runner.ProfileError, match=message):
        runner.run_profile(_profile(tmp_path, text), dry_run=True, repo_root=REPO_ROOT)


def test_only_a_chapter_the_profile_skips_says_so(tmp_path):
    with pytest.raises(runner.ProfileError, match=r"--only \['01_organisms'\]: the profile skips it"):
        runner.run_profile(REPO_ROOT / "params" / "llama2-7b.yaml", only=["01_organisms"], dry_run=True,
                           repo_root=REPO_ROOT)


def test_when_something_goes_wrong_quotes_messages_lib_really_gives():
    text = RERUN_PAGE.read_text(encoding="utf-8")
    section = text.split("## When something goes wrong", 1)[1].split("\n## ", 1)[0]
    source = "".join(path.read_text(encoding="utf-8") for package in ("lib", "bookkit")
                     for path in (REPO_ROOT / package).glob("*.py"))
    quoted = [q for line in section.splitlines() if line.startswith("| ") and not line.startswith("| you see")
              for q in re.findall(r"`([^`]+)`", line.split(" | ")[0])]
    fragments = [f.strip(" .'") for q in quoted for f in re.split(r"\.\.\.|<chapter>|N tokens", q)]
    missing = [f for f in fragments if len(f) > 4 and f not in source]
    assert len(quoted) >= 10 and not missing, missing


def test_runner_writes_nothing_to_stderr(tmp_path, capfd):
    """The kernels the runner starts say nothing on the terminal (ipykernel warns on stderr about unencrypted TCP
    sockets; the runner's kernels use local IPC sockets)."""
    _book(tmp_path, [_parameters_cell(), new_code_cell("print(x)")])
    runner.run_profile(_profile(tmp_path, "defaults:\n  x: 1\nchapters:\n  book/ch:\n    label: b\n"), repo_root=tmp_path)
    captured = capfd.readouterr()
    assert "book/ch: done" in captured.out and captured.err == ""


def test_the_runners_kernels_are_shut_down_without_an_interrupt(monkeypatch):
    """jupyter_client sends SIGINT before every shutdown; landing while the kernel handles its last message, it made
    ipykernel print "ERROR | KeyboardInterrupt caught in kernel." in `make book`'s output. The runner's kernels
    are still interrupted when asked, and not when shut down."""
    import signal

    manager = runner.LocalKernelManager(kernel_name=runner.KERNEL_NAME)
    sent = []
    send = manager._async_signal_kernel

    async def recording(signum):
        sent.append(signum)
        await send(signum)

    monkeypatch.setattr(manager, "_async_signal_kernel", recording)
    manager.start_kernel()
    try:
        manager.interrupt_kernel()
    finally:
        manager.shutdown_kernel()
    assert sent == [signal.SIGINT] and not manager.is_alive()
