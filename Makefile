# Two commands: `make demo` (the miniature world end to end) and `make test` (the test suite).
# Both create .venv on first use: torch from the machine's local CPU build, then the package at the
# exact versions of constraints.txt (the environment README's numbers were made with).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/lavender demo --out demo_out

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments

bench: $(STAMP)
	$(BIN)/python benchmarks/extract_speed.py

clean:
	rm -rf $(VENV) demo_out
