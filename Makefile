# dtriv: `make demo` runs the main job, `make test` the test suite.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dtriv-installed

.PHONY: install demo test test-slow lint bench bench-quick bench-gpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first (a pinned CPU wheel), unless this venv already has one; then the project.
$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments demo

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# the suite (under 10 minutes on 2 cores): benchmarks/RESULTS.md and the README's table
bench: $(STAMP)
	$(PY) benchmarks/run_all.py --readme

# a one-minute subset: benchmarks/RESULTS-quick.md
bench-quick: $(STAMP)
	$(PY) benchmarks/run_all.py --quick

# the GPU table (float32 and bfloat16) on a machine with a CUDA device: benchmarks/RESULTS-gpu.md
bench-gpu: $(STAMP)
	rm -f benchmarks/RESULTS-gpu.md
	$(PY) benchmarks/bench_gpu.py --device cuda --markdown benchmarks/RESULTS-gpu.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
