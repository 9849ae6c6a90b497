# The DiT scaling harness. Quick start: `make sweep` (a small real study on this CPU), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SWEEP ?= sweeps/mini.yaml
# ARGS: more words for sweep, plan and status, e.g. ARGS=--dry-run or ARGS="train.lr=2e-4 name=gflops-lr"
ARGS ?=
COMMA := ,

.PHONY: venv sweep report report-paper plan status test test-fast mutation slurm slurm-down system-deps clean-venv

venv: $(STAMP)

# Reinstalls only when pyproject.toml changes; a second `make venv` does nothing.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

sweep: venv  ## run a sweep end to end (default: the CPU mini study), then render its report
	$(BIN)/harness sweep $(SWEEP) $(ARGS)

report: venv  ## render reports/<sweep>/index.html and report.pdf again
	$(BIN)/harness report $(SWEEP)

report-paper: venv  ## the paper's own Table 4 as a report: reports/paper/
	$(BIN)/harness report --paper

plan: venv  ## runs, Gflops and compute of a sweep, without running it
	$(BIN)/harness plan $(SWEEP) $(ARGS)

status: venv
	$(BIN)/harness status $(SWEEP) $(ARGS)

# Tiny models: one intra-op thread per process beats two threads fighting over two cores. TEST_WORKERS
# pytest-xdist processes (0: one process): a file's tests share a worker, the Slurm tests one worker
# (tests/conftest.py); most of the suite's time is Slurm and subprocesses waiting, so 2 workers on 2 cores
# halve it.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

test: venv  ## the whole suite, slow tests included (what CI runs)
	$(PYTEST) --durations=25

test-fast: venv
	$(PYTEST) -m "not slow"

# Not part of `make test`: hours on 2 cores in all (see README). MODULES=diffusion,spec-run-ids for some;
# SAMPLE=60 checks 60 random mutants per module: an estimate with its interval, for the slow modules.
mutation: venv  ## mutation score per module (mutmut), modules and test subsets in pyproject.toml
	@$(BIN)/python -c "import mutmut" 2>/dev/null || $(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,mutation]'
	OMP_NUM_THREADS=1 $(BIN)/python scripts/mutation.py $(if $(SAMPLE),--sample $(SAMPLE)) $(subst $(COMMA), ,$(MODULES))

system-deps:  ## Debian packages for the browser and PDF checks (root)
	apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver poppler-utils >/dev/null

slurm:  ## a single-node Slurm cluster on localhost, from Debian packages (root)
	bash scripts/local-slurm.sh

slurm-down:
	bash scripts/local-slurm-teardown.sh

clean-venv:
	rm -rf $(VENV)
