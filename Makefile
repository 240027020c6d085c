# The two commands of the README: `make quickstart` and `make test`.
# Both create the virtual environment on first use and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= all

.PHONY: quickstart quickstart-t2i docs-images test test-slow bench-gpu bench-cpu lint format clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

## Train a small DiT on the bundled handwritten digits, sample and evaluate every guidance method,
## print the paper-style table (CPU; every step resumable, a rerun takes seconds). scripts/quickstart.py
quickstart: $(VENV)/.installed
	$(PY) scripts/quickstart.py

## Text-to-image: a small MMDiT + the real MiniLM encoder on captioned digits, then a grid of
## no guidance / CFG / C-ERG / I-ERG / ERG samples (CPU, offline, minutes).
quickstart-t2i: $(VENV)/.installed
	$(PY) scripts/quickstart_t2i.py

## The README's pictures (docs/images/): both quickstarts (resumable: a rerun only copies), then their
## method grid, Pareto plot and text-to-image grid, downsized. scripts/docs_images.py
docs-images: $(VENV)/.installed
	$(PY) scripts/quickstart.py
	$(PY) scripts/quickstart_t2i.py
	$(PY) scripts/docs_images.py

## The default test suite (fast, CPU); CI runs exactly this through .ci/run.
test: $(VENV)/.installed
	$(PY) -m pytest -q

## Longer checks that are not part of the default run.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

## Every GPU figure in one budgeted run (scripts/benchmark_all.py): docs/benchmarks/<gpu>.md and .json.
## Needs no virtual environment (a GPU machine may have only torch and the wheels of
## ../shared/device/prepare.sh): it uses $(VENV)'s python if there is one, else python3.
BENCH_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
BENCH_BUDGET ?= 380
BENCH_OUT ?= docs/benchmarks
bench-gpu:
	$(BENCH_PYTHON) scripts/benchmark_all.py --budget-s $(BENCH_BUDGET) --out $(BENCH_OUT)

## The same stages with tiny sizes on the CPU (the rehearsal the default tests run), into runs/bench-cpu.
bench-cpu:
	$(BENCH_PYTHON) scripts/benchmark_all.py --preset cpu --budget-s 600 --out runs/bench-cpu

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
