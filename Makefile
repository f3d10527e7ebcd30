# Set-up and day-to-day commands. Each target installs what it needs into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test serve

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first and explicitly: a bare `torch` requirement would pull a multi-GB CUDA build.
install: $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

serve: install
	$(BIN)/refusion serve
