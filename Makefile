# `make test` and `make bench` set up .venv from nothing (pinned CPU build of torch) and reuse it after.
# On a machine whose python3 already has torch/triton/transformers (the GPU box), skip the venv:
#   make test PYTHON=python3        make bench PYTHON=python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

ifeq ($(PYTHON),$(VENV)/bin/python)
SETUP := $(STAMP)
endif

.PHONY: test bench lint clean

$(STAMP): requirements-cpu.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-cpu.txt
	touch $(STAMP)

test: $(SETUP)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: $(SETUP)
	$(PYTHON) -m benchmarks.report $(BENCH_ARGS)

lint: $(SETUP)
	$(PYTHON) -m ruff check vitriton tests benchmarks
	$(PYTHON) -m ruff format --check vitriton tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
