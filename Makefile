# pysparse: set-up, build, tests and benchmarks. `make test` on a fresh clone does everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch guesses the CUDA toolkit from the nvcc on PATH, which may be a wrapper; point it at the real one.
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME

.PHONY: setup build test demo bench bench-quick clean

# The virtual environment with torch and the build tools; redone when pyproject.toml changes.
$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q ninja
	touch $@

setup: $(VENV)/.setup-done

# Editable install of pysparse and its test dependencies; compiles the C++ (and CUDA) kernels with ninja.
build: setup
	$(PIP) install -q --no-build-isolation -e ".[test]"

test: build
	$(PY) -m pytest tests -q

# The whole pipeline on scikit-learn's digits: dense CNN -> prune 90% -> sparse conditional GAN -> 10 synthetic
# images per class -> data-free retraining -> report in runs/demo/report.md (rerunning replaces its own files).
demo: build
	$(PY) -m pysparse demo --out runs/demo --overwrite

# Speed benchmarks (pytest-benchmark); figures go to benchmarks/RESULTS.md.
bench: build
	$(PY) -m pytest benchmarks -q --benchmark-columns=min,median,mean,rounds --benchmark-json=benchmarks/out/bench.json
	$(PY) benchmarks/summarize.py benchmarks/out/bench.json

clean:
	rm -rf build *.egg-info pysparse/_C*.so .pytest_cache .benchmarks
