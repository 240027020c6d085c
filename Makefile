# The commands of the README: `make quickstart`, `make test` and `make test-slurm`.
# Both create the virtual environment on first use and install the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= all

.PHONY: quickstart quickstart-t2i test test-slow test-slurm lint format clean-venv

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

## The default test suite (fast, CPU); CI runs exactly this through .ci/run.
test: $(VENV)/.installed
	$(PY) -m pytest -q

## Longer checks that are not part of the default run.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

## The tests on a real scheduler: a one-host SLURM cluster (slurm/local_cluster.sh: root, installs
## slurm-wlm + munge with apt-get if missing), the tests marked `slurm`, then the cluster stopped,
## also when a test fails (the exit status is the tests').
test-slurm: $(VENV)/.installed
	slurm/local_cluster.sh start
	status=0; eval "$$(slurm/local_cluster.sh env)" && ERG_VENV="$(abspath $(VENV))" $(PY) -m pytest -q -m slurm || status=$$?; \
	slurm/local_cluster.sh stop; exit $$status

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
