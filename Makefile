# Presso: `make demo` sets up and runs the quickstart; `make test` sets up and runs the tests.
# Both need only python3 (>= 3.11) and pip; the virtual environment goes to .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine use e.g. `make setup TORCH=torch==2.13.0` with a CUDA index.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installed once per change of pyproject.toml. torch goes first, pinned, so that no dependency
# pulls a multi-GB CUDA build of a newer torch.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/presso run jobs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The quick variants (minutes each); drop --quick for the full tables in bench/results/.
# Peer rows need `pip install -e '.[peers]'` (llm-compressor, galore-torch; it pins transformers 5.17).
bench: setup
	$(BIN)/python bench/gradcomp.py --quick && $(BIN)/python bench/optim.py --quick
	$(BIN)/python bench/ptq.py --quick && $(BIN)/python bench/budget.py --quick

clean:
	rm -rf presso_runs .pytest_cache
