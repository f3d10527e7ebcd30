# Set-up and day-to-day commands. Each target installs what it needs into .venv first: once, and again
# when pyproject.toml changes (.venv/.installed), so a service already installed starts without a
# package index. A .venv that cannot run the project (a Python older than 3.10, or no pip: a first run
# that failed) is made again. Two installs at once (make test beside make serve in a fresh clone) take
# turns on LOCK (flock, util-linux; without flock they do not wait): the second finds .venv made.
PY ?= python3
# refusion serve's flags, from make's command line only (an ARGS in the environment is not taken):
# make serve ARGS="--port 8001 --model /path/to/model"
ARGS :=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := .install.lock
USABLE := import sys, importlib.util; sys.exit(sys.version_info < (3, 10) or importlib.util.find_spec("pip") is None)
NEW_ENOUGH := import sys; sys.exit(sys.version_info < (3, 10) and "refusion-serve needs Python 3.10 or newer; " \
	+ sys.executable + " is " + sys.version.split()[0] \
	+ ": run make with PY=<a python3.10 or newer>, e.g. make test PY=python3.11")

# torch stays 2.13.0 when the project's dependencies install (named again: pip may otherwise swap it for
# another build); a CPU build gets the tests' Triton (pyproject's cpu-tests), a CUDA build keeps its own
CPU_TORCH := import sys, torch; sys.exit(torch.version.cuda is not None)

.PHONY: install test serve

# torch==2.13.0 first and explicitly: a bare `torch` requirement would pull a multi-GB CUDA build.
install:
	@exec 9>$(LOCK); \
	if command -v flock >/dev/null 2>&1 && ! flock -n 9; then \
		echo "waiting for another make install here to finish ($(LOCK))"; flock 9 || exit 1; \
	fi; \
	if ! $(BIN)/python -c '$(USABLE)' 2>/dev/null; then \
		$(PY) -c '$(NEW_ENOUGH)' || exit 1; \
		echo "creating $(VENV) with $(PY)"; rm -rf $(VENV) && $(PY) -m venv $(VENV) || exit 1; \
	fi; \
	if [ ! $(STAMP) -nt pyproject.toml ]; then \
		echo "installing torch==2.13.0 and the project into $(VENV)"; \
		$(BIN)/python -m pip install -q torch==2.13.0 || exit 1; \
		extras=test; \
		if $(BIN)/python -W ignore -c '$(CPU_TORCH)' 2>/dev/null; then extras=test,cpu-tests; fi; \
		$(BIN)/python -m pip install -q -e ".[$$extras]" torch==2.13.0 || exit 1; \
		touch $(STAMP); \
	fi

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

serve: install
	$(BIN)/refusion serve $(ARGS)
