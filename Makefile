# Two commands set everything up on a fresh machine:
#   make demo   -> virtual environment + packages, then `bakeoff demo`
#   make test   -> the same environment, then the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[offline-weights,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bakeoff demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) bakeoff-demo
