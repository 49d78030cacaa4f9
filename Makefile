# One command sets up a virtual environment and runs the whole test suite: `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo bench clean

$(VENV)/.installed: setup.py requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# The full suite, slow end-to-end tests included (what CI runs).
test: setup
	$(PY) -m pytest -n 2 --run-slow $(PYTEST_ARGS)

# The fast tier only.
test-fast: setup
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
