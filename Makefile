# Each target builds the virtual environment (.venv) on first use and installs into it what it
# needs: `demo` the training extra, `check` the core, `test` everything (the [test] extra holds
# [train] and [hf], so torch and transformers come only with `make test`). One stamp file per
# install; each is redone when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# the library core: numpy, jax, flax, optax, einops, safetensors, tokenizers, tqdm
$(VENV)/.installed-core: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

# + matplotlib, tensorboardX, sacrebleu: the demo writes loss.png and TensorBoard event files
$(VENV)/.installed-train: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[train]'
	touch $@

# + torch (CPU), transformers, the pretrained MiniLM, pytest, hypothesis, import-linter, scikit-learn
$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

## demo: the main job on built-in data: train a small GPT on the Python stdlib source, verified
## against the NumPy reference, then perplexity, a sample, throughput and the loss plot
demo: $(VENV)/.installed-train
	$(PY) -m bigmodel_apps demo

## check: the parity report of every layer and model (NumPy reference vs JAX)
check: $(VENV)/.installed-core
	$(PY) -m bigmodel_apps check

## test: the package-stack contracts (import-linter, see pyproject.toml), then the whole test suite
test: $(VENV)/.installed-test
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider -n 2

clean:
	rm -rf $(VENV) .hypothesis .pytest_cache
