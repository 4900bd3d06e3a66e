# The README's two commands are `make demo` and `make test`; both set up the environment first.
#
# The virtual environment lives outside the checkout, keyed by a hash of pyproject.toml, so a fresh clone
# with unchanged dependencies reuses it (the ~5.5 GB torch install happens once per dependency set).
PYTHON ?= python3
DEPS_HASH := $(shell $(PYTHON) -c "import hashlib;print(hashlib.sha256(open('pyproject.toml','rb').read()).hexdigest()[:12])")
VENV ?= $(HOME)/.cache/unclip/venv-$(DEPS_HASH)
BIN := $(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup demo test test-fast lint format clean-runs bench-setup bench bench-quick

$(VENV)/.deps-installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e ".[test,slurm]"
	$(BIN)/python -c "import torch, torchvision, open_clip; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| open_clip', open_clip.__version__)"
	touch $@

# Point the (possibly cached) environment at this checkout; cheap, so it runs every time.
setup: $(VENV)/.deps-installed
	@$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null
	@echo "environment: $(VENV)"

# The main job: train on the embedded shapes data and print the evaluation.
demo: setup
	bash recipes/shapes/run.sh

# One pytest worker per core (pytest-xdist), a test file per worker at a time, one torch thread each:
# the CLI tests spend most of their time importing torch and open_clip in subprocesses, which overlap.
PYTEST_PARALLEL := -n auto --dist loadfile

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

lint: setup
	$(BIN)/ruff check unclip tests benchmarks recipes
	$(BIN)/ruff format --check unclip tests benchmarks recipes

format: setup
	$(BIN)/ruff format unclip tests benchmarks recipes
	$(BIN)/ruff check --fix unclip tests benchmarks recipes

clean-runs:
	rm -rf runs outputs multirun

# Speed against the peers (benchmarks/README.md). The peers (diffusers, dalle2-pytorch) live in their own
# environment so they never leak into the tests; it has the same torch as the main one.
BENCH_VENV ?= $(HOME)/.cache/unclip/bench-venv-$(DEPS_HASH)
BENCH_ARGS ?=

$(BENCH_VENV)/.deps-installed: pyproject.toml
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BENCH_VENV)/bin/python -m pip install --quiet -e ".[bench]"
	$(BENCH_VENV)/bin/python -c "import torch, diffusers, dalle2_pytorch; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| dalle2-pytorch ok')"
	touch $@

bench-setup: $(BENCH_VENV)/.deps-installed
	@$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null
	@echo "benchmark environment: $(BENCH_VENV)"

bench: bench-setup
	$(BENCH_VENV)/bin/python -m benchmarks.run $(BENCH_ARGS)

bench-quick: bench-setup
	$(BENCH_VENV)/bin/python -m benchmarks.run --quick $(BENCH_ARGS)
