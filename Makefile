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

## demo: the main job on built-in data: train a small GPT on the Python stdlib source, verified
## against the NumPy reference, then perplexity, a sample, throughput and the loss plot
demo: $(VENV)/.installed
	$(PY) -m bigmodel_apps demo

## check: the parity report of every layer and model (NumPy reference vs JAX)
check: $(VENV)/.installed
	$(PY) -m bigmodel_apps check

## test: the package-stack contracts (import-linter, see pyproject.toml), then the whole test suite
test: $(VENV)/.installed
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider -n 2

clean:
	rm -rf $(VENV) .hypothesis .pytest_cache
