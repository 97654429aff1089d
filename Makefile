# `make demo` and `make test` work from a clean clone: they create .venv on first use.
# `make test JAX_VERSION=0.11.2` (or `make test-jax011`): the suite on that JAX, in a venv of
# its own (.venv-jax0.11.2); JAX 0.11 needs Python >= 3.12 (CONTRIBUTING.md, "Two JAX versions")
ifneq ($(JAX_VERSION),)
PYTHON ?= python3.12
VENV ?= .venv-jax$(JAX_VERSION)
JAX_PIN := "jax==$(JAX_VERSION)" "jaxlib==$(JAX_VERSION)"
endif
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The demo trains on the TinyShakespeare copy shipped in linearnexus/assets/; set
# LINEARNEXUS_SHAKESPEARE=PATH (or pass --data to train_lm.py) to use another file.

.PHONY: setup demo test test-jax011 lint smoke bench clean rl-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]" $(JAX_PIN)
	touch $(STAMP)

setup: $(STAMP)

# ~1-2 min on a 2-core CPU (800 steps, val loss ~1.84), then a 300-character sample
demo: $(STAMP)
	$(PY) train_lm.py --model gpt-small --max-steps 800 --batch-size 12 --seq-len 64 \
		--eval-interval 200 --out runs/demo --overwrite --sample-tokens 300

# SFT a tiny char-level model on two-digit addition, then GRPO and PPO from it (docs/rl.md);
# writes benchmarks/results/rl_demo.json
rl-demo: $(STAMP)
	$(PY) benchmarks/rl_demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check linearnexus tests examples benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 tests
	# 8 simulated devices: a process of its own (XLA reads the device count at start-up)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -n 2 --dist worksteal --durations=15 tests/multidevice

test-jax011:
	$(MAKE) test JAX_VERSION=0.11.2

# every op's every backend vs its reference, every block's forward + decode step (< 90 s)
smoke: $(STAMP)
	$(PY) -m linearnexus.tools.smoke --jobs 2

bench: $(STAMP)
	$(PY) benchmarks/mamba_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
