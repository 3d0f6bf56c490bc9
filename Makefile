# `make test` and `make bench` set up .venv from nothing (pinned CPU build of torch) and reuse it after.
# On a machine whose python3 already has torch/triton/transformers (the GPU box), skip the venv:
#   make test PYTHON=python3        make bench PYTHON=python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
# make bench-parallel: TP1, TP2, TP4 and DP2, DP4 side by side under torchrun (one process per GPU). NVLink
# multicast (NVLS) stays off in every multi-GPU run of this project. On a CPU: PARALLEL_ARGS="--device cpu".
NPROC ?= 4
PARALLEL_ARGS ?= --models clip-vit-l14-336 siglip-so400m-384 clip-vit-bigg14-224 --batch-sizes 1 8 128 \
	--providers vitriton vitriton-graphs --warm-caches

ifeq ($(PYTHON),$(VENV)/bin/python)
SETUP := $(STAMP)
endif

.PHONY: test bench bench-parallel lint clean

$(STAMP): requirements-cpu.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-cpu.txt
	touch $(STAMP)

test: $(SETUP)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: $(SETUP)
	$(PYTHON) -m benchmarks.report $(BENCH_ARGS)

bench-parallel: $(SETUP)
	NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
	$(PYTHON) -m torch.distributed.run --standalone --nproc-per-node $(NPROC) \
		-m benchmarks.report --parallel all $(PARALLEL_ARGS) $(BENCH_ARGS)

lint: $(SETUP)
	$(PYTHON) -m ruff check vitriton tests benchmarks
	$(PYTHON) -m ruff format --check vitriton tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
