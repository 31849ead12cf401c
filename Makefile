# Quick start: `make demo` (set up, build, run `python -m paca_kernels`) and `make test`.
# Everything lives in $(VENV); an installed torch >= 2.11 is kept (see scripts/bootstrap.sh).

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
SOURCES := $(shell find csrc -type f 2>/dev/null) CMakeLists.txt setup.py pyproject.toml

.PHONY: demo test bench gpu-check setup build lint clean triton36

demo: build
	$(PY) -m paca_kernels

# The Triton resource gate also runs under Triton 3.6 (the GPU machine's version) when its small
# environment can be made (tests/backends/test_triton_resources.py skips that half, saying why, if not).
# `make test PYTEST_ARGS="tests/test_models.py -k pretrained"` runs only what PYTEST_ARGS names (after
# the same build), not the suite plus it; with no PYTEST_ARGS, the suite and the benchmark smoke run.
test: build triton36
ifeq ($(strip $(PYTEST_ARGS)),)
	$(PY) -m pytest tests -q -ra --durations=10
	$(PY) -m pytest benchmarks -q -ra --benchmark-disable -p no:cacheprovider
else
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)
endif

# Full benchmark run on this machine's default device; JSON under benchmarks/results/, then
# BENCHMARKS.md and benchmarks/results/history.csv regenerated from every results file.
bench: build
	$(PY) -m pytest benchmarks --benchmark-only \
		--benchmark-json=benchmarks/results/$$($(PY) -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu")')-$$(date +%F).json
	$(PY) scripts/bench_report.py --plots

# One-shot GPU check (scripts/gpu_check.sh): build with CUDA, GPU tests, bf16 benchmarks, all under
# $(GPU_CHECK_OUT) within 8 minutes. Uses the machine's python3 as is (GPU machines: no network, so no
# bootstrap); `make test` dry-runs it.
GPU_CHECK_OUT ?= gpu-check-out
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_OUT)

setup: $(VENV)/.paca-setup

build: $(VENV)/.paca-build

$(VENV)/.paca-setup: scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	touch $@

# Rebuild the C++ extension when a source or the build description changes (CMake + ninja are
# incremental, so a rebuild only recompiles what changed). --no-deps: never let pip resolve torch.
$(VENV)/.paca-build: $(VENV)/.paca-setup $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

triton36: setup
	-VENV=$(VENV) bash scripts/triton_gate.sh --setup || echo "Triton 3.6 environment not made: its gate test will skip"

lint: setup
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check paca_kernels tests scripts

clean:
	rm -rf .venv-triton36 build *.egg-info paca_kernels/_C*.so paca_kernels/_build_info.json $(VENV)/.paca-build
