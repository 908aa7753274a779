# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install lint bench gpu-wheels

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
	$(BIN)/ruff check vlpretrain tests bench tools && $(BIN)/ruff format --check vlpretrain tests bench tools

bench: install
	$(BIN)/python bench/run_all.py

# Wheels a bare CUDA machine with torch lacks (PyAV for video, torchdata for the loader), for
# bench/gpu_device.sh to install offline. Python 3.12, x86_64 manylinux; about 34 MiB.
GPU_WHEELS := av==19.0.2 torchdata==0.11.0
gpu-wheels:
	mkdir -p gpu_wheels
	$(PYTHON) -m pip download --dest gpu_wheels --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_28_x86_64 --platform any $(GPU_WHEELS)
	du -sh gpu_wheels
