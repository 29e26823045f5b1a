# The two commands: `make demo` and `make test`. Both install what is missing first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DATA := build/demo-data

.PHONY: install demo test test-unit lint testbed wheel-check benchmark faults clean

install: $(STAMP)

# torch/torchvision are pinned to the releases this project is tested with (a CUDA build that
# also runs on the CPU); everything else comes from pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/gpu-run demo-data $(DEMO_DATA)
	$(BIN)/gpu-run train --host local --data $(DEMO_DATA) --epochs 2 --weights none --image-size 112

testbed: install
	bash tests/bed/up.sh

test: testbed
	$(BIN)/python -m pytest -q --durations=30

# The tests that need no test bed (no Docker engine, sshd or moto): `integration` marks the rest.
# The unit tests, in seconds and without the test bed (no model training: that is `slow`).
test-unit: install
	$(BIN)/python -m pytest -q -m "not integration and not slow"

# Lint (ruff: tests and benchmarks too), the formatter's check, and the type check; each reads its
# settings, and mypy its files, from pyproject.toml.
lint: install
	$(BIN)/ruff check launcher trainer tests benchmarks
	$(BIN)/ruff format --check launcher trainer
	$(BIN)/mypy

# The wheel as a user installs it, in a fresh venv outside the checkout (and the launcher on Python 3.10).
wheel-check: testbed
	bash tests/bed/wheel.sh

benchmark: install
	$(BIN)/python benchmarks/bench_trainer.py

# The fault matrix, printed as a table (runs on the test bed, several minutes).
faults: testbed
	$(BIN)/python benchmarks/faults.py

clean:
	rm -rf build runs .pytest_cache
