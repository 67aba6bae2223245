# The whole set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
WORKDIR ?= runs/demo
# constraints.txt pins the versions tested together here; drop it (CONSTRAINTS=) on newer hosts.
CONSTRAINTS ?= -c constraints.txt
PYTEST_ARGS ?=
# `make test` runs its test files on this many pytest-xdist workers (0: in one process).
TEST_WORKERS ?= 2

.PHONY: demo test test-slow bench venv clean

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q $(CONSTRAINTS) -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m rat_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

# Default test run (times in docs/benchmarks.md): each test file runs whole on one worker, so
# its module fixtures (a sweep, a trained pool) are built once. Exit code 5 (no tests collected)
# counts as failure of the set-up, so it is reported, not hidden.
# pytest runs with the glibc malloc settings rat_jax's entry points give themselves (runtime.py).
MALLOC_ENV = env $$($(PY) -m rat_jax.runtime)

test: $(VENV)/.installed-test
	$(MALLOC_ENV) $(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

test-slow: $(VENV)/.installed-test
	$(MALLOC_ENV) $(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

bench: $(VENV)/.installed-test
	$(PY) bench/members.py --quick

clean:
	rm -rf $(VENV) runs
