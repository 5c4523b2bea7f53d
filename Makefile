# The two front-door commands. `make test` builds .venv from nothing and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: setup test bench

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# Without a GPU the Triton kernels run through Triton's interpreter.
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q

bench: setup
	$(PY) -m pytest bench -q
