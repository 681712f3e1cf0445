# Two commands do all the set-up on a fresh machine:
#   make demo   -- create .venv, install wsi_xr, run the pipeline on a built-in synthetic slide
#   make test   -- create .venv, install wsi_xr with test extras, lint (ruff), type-check (mypy), run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wsi-xr demo --out demo_output

test: $(STAMP)
	$(BIN)/ruff check wsi_xr tests benchmarks
	$(BIN)/ruff format --check wsi_xr tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_output
