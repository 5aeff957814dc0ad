# Two commands on a fresh machine: `make demo` and `make test`.
# TORCH picks the PyTorch build: the default is the CPU wheel this environment provides;
# point it elsewhere for your own machine, e.g.
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
#   make demo TORCH=skip        # keep the torch already in $(PYTHON)'s venv
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This environment's pip config lists index folders that may not exist; hide those warnings only.
QUIET  := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: demo test test-fast test-perturbed bench docs typecheck clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ "$(TORCH)" != "skip" ]; then $(PIP) install $(TORCH) $(QUIET); fi
	$(PIP) install -e . $(QUIET)
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -e ".[test]" $(QUIET)
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/phaselens demo

# WORKERS test processes (pytest-xdist), each given whole files, so a file's module fixtures are built once; the
# session fixtures (the demo run, ...) are built once per process that needs them. WORKERS=0 runs in this process.
WORKERS ?= 2
XDIST   := $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadfile)

test: $(VENV)/.test
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# Skips the slow end-to-end runs (they still run in `make test` and CI).
test-fast: $(VENV)/.test
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

# The demo's claims that hold for any seed and thread count, on a demo trained with 2 torch threads (the preset
# trains on 1) and seed 1 (tests/conftest.py): a test that leans on one machine's digits fails here. CI runs it;
# the reference run's own claims (seed 0) are skipped, the 1-layer control is left out (~3 min in all).
test-perturbed: $(VENV)/.test
	PHASELENS_TEST_THREADS=2 PHASELENS_TEST_SEED_OFFSET=1 $(PY) -m pytest -m slow -k "demo and not control" \
		tests/test_demo.py tests/test_transitions.py $(PYTEST_ARGS)

$(VENV)/.docs: $(VENV)/.base
	$(PIP) install -e ".[docs]" $(QUIET)
	touch $@

# The docs site (mkdocs-material) into site/; --strict turns every warning into an error. The CLI reference,
# the Python API, the config and HTTP tables and the benchmark tables are generated from the code (docs/hooks/).
docs: $(VENV)/.docs
	$(VENV)/bin/mkdocs build --strict --site-dir site

# mypy over the public API (`import phaselens as pl` names and their modules) and the export package, with the
# settings and file list in pyproject.toml ([tool.mypy]); no errors allowed.
typecheck: $(VENV)/.test
	$(PY) -m mypy

bench: $(VENV)/.base
	$(PY) benchmarks/telemetry_overhead.py

clean:
	rm -rf runs .pytest_cache site
