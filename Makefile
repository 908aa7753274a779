# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install lint bench

$(BIN)/vlpretrain: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/vlpretrain

install: $(BIN)/vlpretrain

demo: install
	$(BIN)/vlpretrain demo --output demo_out

test: install
	$(BIN)/mypy vlpretrain && $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check vlpretrain tests bench && $(BIN)/ruff format --check vlpretrain tests bench

bench: install
	$(BIN)/python bench/run_all.py
