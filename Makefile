# Two entry points: `make demo` and `make test`. Both set up .venv idempotently.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fairllava-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast bench results clean benchmark benchmark-derm benchmark-cxr benchmark-report

install: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt requirements/nodeps.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q torch==2.13.0            # FIRST: the CPU wheel; nothing below may replace it
	$(PIP) install -q -r requirements/lock.txt
	$(PIP) install -q --no-deps -r requirements/nodeps.txt
	$(PIP) install -q --no-deps -e .
	@! $(PY) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)" || (echo "torchvision must not be installed beside torch 2.13 CPU" && exit 1)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fairllava demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache

# Re-run the default demo and write its results table into README.md (between the demo-results markers).
results: $(STAMP)
	$(VENV)/bin/fairllava demo --out demo_out --update-readme README.md $(DEMO_ARGS)

# The paper-scale device check (bench/gpu_check.py, docs/gpu.md). On a GPU machine it runs with the system python
# (no .venv needed; it pip-installs the working tree with --no-deps). gpu-check-tiny: the same script on the CPU.
.PHONY: gpu-check gpu-check-tiny
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-tiny:
	$(GPU_PY) bench/gpu_check.py --tiny --no-install $(GPU_CHECK_ARGS)

# The pre-registered benchmark (docs/protocol.md): one final plan per task, each first checked against its
# selection folder (the final plan must hold exactly the chosen settings), run or resumed (finished runs are never
# redone), then one leaderboard over both with one primary family (leaderboard.{md,csv,html,json} + plots).
BENCHMARK_OUT  ?= sweeps/final
BENCHMARK_ARGS ?= --jobs 2 --threads-per-job 1
SELECTION_DERM ?= sweeps/selection
SELECTION_CXR  ?= sweeps/selection-cxr
benchmark-derm: $(STAMP)
	$(VENV)/bin/fairllava benchmark check configs/benchmark/final-derm.yaml --against $(SELECTION_DERM)
	$(VENV)/bin/fairllava benchmark run configs/benchmark/final-derm.yaml --out $(BENCHMARK_OUT)/derm-vqa $(BENCHMARK_ARGS)
benchmark-cxr: $(STAMP)
	$(VENV)/bin/fairllava benchmark check configs/benchmark/final-cxr.yaml --against $(SELECTION_CXR)
	$(VENV)/bin/fairllava benchmark run configs/benchmark/final-cxr.yaml --out $(BENCHMARK_OUT)/cxr-report $(BENCHMARK_ARGS)
# One task after the other even under `make -j` (two sweeps at once would oversubscribe the cores).
benchmark: $(STAMP)
	$(MAKE) benchmark-derm
	$(MAKE) benchmark-cxr
	$(MAKE) benchmark-report
# The leaderboard of whatever final folders exist (a derm-vqa-only one is labelled partial) into
# docs/results/final, and its headline block into README.md.
BENCHMARK_BOARD ?= docs/results/final
benchmark-report: $(STAMP)
	$(VENV)/bin/fairllava benchmark report $(wildcard $(BENCHMARK_OUT)/derm-vqa $(BENCHMARK_OUT)/cxr-report) \
		--to $(BENCHMARK_BOARD) --head-to-head fairllava-selected --update-readme README.md
