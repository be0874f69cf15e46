# Presso: `make demo` sets up and runs the quickstart; `make test` sets up and runs the tests.
# Both need only python3 (>= 3.11) and pip; the virtual environment goes to .venv.
#
# Installs are reproducible: requirements.lock pins every package (with sha256 hashes) at the
# versions the test suite last passed with, and `make setup` installs exactly that, with no
# dependency resolution. `make lock` refreshes the lock to the newest versions pyproject.toml
# allows; `make test-latest` runs the tests on those newest versions in a separate venv, so
# drift in our dependencies is found on purpose, not by a new user.

PYTHON ?= python3
# Ray (2.60) starts each worker with `bash -c "exec <python> ..."`, the interpreter's path
# unquoted, so no Ray worker starts from a venv whose path holds a space. A checkout in such a
# path keeps its venv under ~/.cache/presso/venvs/ and .venv links there.
ifeq ($(word 2,$(CURDIR)),)
VENV ?= .venv
else
VENV ?= $(HOME)/.cache/presso/venvs/$(shell printf '%s' "$(CURDIR)" | sha256sum | cut -c1-16)
endif
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine use e.g. `make setup TORCH=torch==2.13.0` with a CUDA
# index. torch stays out of the lock (its build differs per machine) and is installed first, so
# that nothing pulls a multi-GB CUDA build of a newer torch.
TORCH ?= torch==2.13.0
LOCK := requirements.lock
PIP = -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench lock test-latest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	test "$(VENV)" = .venv || ln -sfn "$(VENV)" .venv

$(VENV)/.installed: $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python $(PIP) install "$(TORCH)"
	$(BIN)/python $(PIP) install --no-deps --require-hashes -r $(LOCK)
	$(BIN)/python $(PIP) install --no-deps --no-build-isolation -e .
	$(BIN)/python $(PIP) check
	touch $@

setup: $(VENV)/.installed
	@echo "presso is installed in .venv: run .venv/bin/presso --help (or: source .venv/bin/activate)"

demo: setup
	$(BIN)/presso run jobs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# pip-tools in a venv of its own, so that it never changes the project's.
lock:
	test -x .venv-lock/bin/pip-compile || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/python $(PIP) install pip-tools; }
	echo "$(TORCH)" > .venv-lock/torch-pin.txt
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile --quiet --upgrade \
		--extra dev --all-build-deps --generate-hashes --strip-extras \
		--unsafe-package torch --constraint .venv-lock/torch-pin.txt \
		--no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml

# The newest versions pyproject.toml allows (torch held at $(TORCH)), then the whole suite.
LATEST := $(VENV)-latest
test-latest:
	rm -rf "$(LATEST)" && $(PYTHON) -m venv "$(LATEST)"
	echo "$(TORCH)" > "$(LATEST)/torch-pin.txt"
	$(LATEST)/bin/python $(PIP) install "$(TORCH)"
	$(LATEST)/bin/python $(PIP) install --constraint "$(LATEST)/torch-pin.txt" -e ".[dev]"
	$(LATEST)/bin/python $(PIP) check
	$(LATEST)/bin/python .ci/lock_drift.py $(LOCK)
	$(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

# The quick variants (minutes each); drop --quick for the full tables in bench/results/.
# Peer rows need `pip install -e '.[peers]'` (llm-compressor, galore-torch; it pins transformers 5.17).
bench: setup
	$(BIN)/python bench/gradcomp.py --quick && $(BIN)/python bench/lgreco_errors.py --quick
	$(BIN)/python bench/optim.py --quick
	$(BIN)/python bench/ptq.py --quick && $(BIN)/python bench/budget.py --quick

clean:
	rm -rf presso_runs .pytest_cache
