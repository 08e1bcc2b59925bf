# Two entry points, each doing all of its own setup on a fresh machine:
#   make quickstart   venv + packages + Fashion-MNIST, then the main job
#   make test         venv + packages + Fashion-MNIST, then the test suite
PYTHON ?= python3
VENV   ?= .venv
DATA   ?= data
BIN     = $(VENV)/bin
# the stamp changes with pyproject.toml, so a changed dependency list reinstalls
STAMP   = $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
FMNIST  = $(DATA)/FashionMNIST/raw/t10k-labels-idx1-ubyte

.PHONY: setup data quickstart quickstart-central test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,simulation]'
	rm -f $(VENV)/.installed-* && touch $@

data: $(FMNIST)

$(FMNIST): | $(STAMP)
	$(BIN)/noprop-data fetch fashion-mnist --root $(DATA)

# federated: noprop-server + 4 noprop-client processes on 127.0.0.1 (settings at the top of the script)
quickstart: setup data
	DATA=$(DATA) BIN=$(BIN) OUT=runs/quickstart scripts/quickstart.sh

# the same network trained on one machine, no federation
quickstart-central: setup data
	$(BIN)/noprop-train --dataset fashion-mnist --data-root $(DATA) --epochs 1 --out runs/quickstart-central

# whole test modules spread over WORKERS pytest-xdist processes, the longest first (tests/conftest.py orders
# them; every Ray simulation is in tests/test_sim.py, so one runs at a time). Federations of real processes
# mostly wait on Flower's heartbeats and timeouts; 3 workers measured fastest on 2 cores (BENCHMARKS.md)
WORKERS ?= 3
PARALLEL = -n $(WORKERS) --dist loadscope --no-loadscope-reorder

# the whole suite (unit, sim and e2e tiers; markers in pyproject.toml), then its 25 slowest tests
test: setup data
	NOPROP_DATA=$(abspath $(DATA)) $(BIN)/python -m pytest -q $(PARALLEL) --durations=25

# the unit tier only (no federation, no real processes): stops at the first failure, then its 15 slowest tests
test-fast: setup data
	NOPROP_DATA=$(abspath $(DATA)) $(BIN)/python -m pytest -q $(PARALLEL) -x -m unit --durations=15

lint: setup
	$(BIN)/ruff check .

bench: setup data
	$(BIN)/python bench/accuracy.py --data-root $(DATA)

clean:
	rm -rf $(VENV) runs .pytest_cache
