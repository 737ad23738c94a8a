# Each target builds its own virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

## demo: the main job on built-in data (for now: the parity report of every layer)
demo: $(VENV)/.installed
	$(PY) -m bigmodel_jax check

## test: the whole test suite
test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider -n 2

check: demo

clean:
	rm -rf $(VENV) .hypothesis .pytest_cache
