# The two commands a new user runs: `make demo` and `make test`.
# Both create the virtual environment on first use and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is test-only; the CPU build 2.13.0 (a local wheel) keeps the venv small.
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m espo_jax.main --config=configs/default.py --workdir=runs/demo

# Whole test modules spread over TEST_WORKERS processes (pytest-xdist); 0 runs them in one.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	for b in experiments/benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs
