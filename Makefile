# `make demo` and `make test` work from a clean clone: they create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Where the demo reads TinyShakespeare from; override with `make demo LINEARNEXUS_SHAKESPEARE=...`.
LINEARNEXUS_SHAKESPEARE ?= $(abspath ../shared/data/tinyshakespeare/input.txt)
export LINEARNEXUS_SHAKESPEARE

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/run_mamba_reference.py --batch 2 --seq 256 --hidden 64 --chunk 16

lint: $(STAMP)
	$(VENV)/bin/ruff check linearnexus tests examples benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -n 2 tests

bench: $(STAMP)
	$(PY) benchmarks/mamba_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
