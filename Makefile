# Two commands set everything up on a fresh machine (tests run in two processes, one file each,
# so the 2-core CI machine overlaps one test's process start-up with another's training):
#   make demo   -> virtual environment + bakeoff, then `bakeoff demo`
#   make test   -> the same environment plus every extra and test tool, then the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORE   := $(VENV)/.installed-core
FULL   := $(VENV)/.installed-test
EXTRAS := offline-weights,test,tensorflow,serve,report,ray,mlflow

.PHONY: demo test venv clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(CORE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[offline-weights,report]'
	touch $@

$(FULL): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(CORE)

demo: $(CORE)
	$(BIN)/bakeoff demo

# The report's tests drive Debian's Chromium headless (never a downloaded browser build).
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver)

# One thread per trial (OMP_NUM_THREADS, which trials follow): two test processes on two cores, each
# starting trials that would otherwise take every core, wait on descheduled threads at every step.
test: $(FULL) browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) bakeoff-demo
