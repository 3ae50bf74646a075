# Quick start: `make demo` runs the offline demo, `make test` runs the tests.
# Both create the virtual environment and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# No wheel cache: it would double the disk that torch's CUDA libraries take.
PIP_INSTALL := pip install -q --no-cache-dir
FMNIST_DIR := /usr/share/datasets/fashion-mnist
# Runs as root directly, else through sudo when it is available.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-torch setup data tensorboard

demo: setup data
	$(PY) main.py $(ARGS)

# The test files run in TEST_WORKERS processes (pytest-xdist; each file's
# tests in one process, so module fixtures are built once): most of a test's
# time is XLA compiling, on one core.
TEST_WORKERS ?= 2
# The tests check what the compiled programs compute, not their speed, and
# their tiny programs spend a third of their compile time in LLVM's
# optimisation of XLA:CPU's kernels: LLVM's level 0 compiles the same HLO
# (XLA's fusions and cost analysis are unchanged) faster and runs it slower.
# The torch suite's full-resolution runs keep XLA's default, which is faster
# for them; so do benchmarks and users' runs. The environment carries the
# flag to the tests' subprocesses; a developer's own XLA_FLAGS come after it.
TEST_XLA_FLAGS ?= --xla_backend_optimization_level=0
test: setup data
	XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS" $(PY) -m pytest -q \
	  -n $(TEST_WORKERS) --dist loadfile tests $(ARGS)

# TensorBoard on the runs' event files (every seed_N/ below LOGDIR);
# e.g. make tensorboard LOGDIR=runs/fmnist ARGS="--port 6007 --bind_all".
LOGDIR ?= runs
tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(LOGDIR) $(ARGS)

# The torchvision parity tests, the PyTorch reference's quantizer against
# dtq_jax.quant and the full-resolution paper settings (torch writes their
# .pth weights), in a separate environment because the torch build is large
# (about 5.4 GB with its CUDA libraries; it runs on the CPU). That environment
# holds only torch and torchvision: a .pth file puts the main environment's
# packages on its path, so jax and TensorFlow are not installed twice (CI's
# disk once ran out with two full copies).
TORCH_VENV ?= .venv-torch
PURELIB := 'import sysconfig; print(sysconfig.get_path("purelib"))'
test-torch: $(TORCH_VENV)/.installed
	$(TORCH_VENV)/bin/python -m pytest -q tests/weights/test_pretrained.py \
	  tests/weights/test_state_dicts.py \
	  tests/benchmark_scripts/test_torch_reference.py \
	  tests/benchmark_scripts/test_op_profile_torch.py \
	  tests/test_paper_smoke.py $(ARGS)

$(TORCH_VENV)/.installed: $(VENV)/.installed requirements-torch.txt
	$(PY) -m venv $(TORCH_VENV)
	main=$$($(PY) -c $(PURELIB)) && torch=$$($(TORCH_VENV)/bin/python -c $(PURELIB)) \
	  && echo "$$main" > "$$torch/dtq_main_venv.pth"
	$(TORCH_VENV)/bin/$(PIP_INSTALL) --upgrade pip
	$(TORCH_VENV)/bin/$(PIP_INSTALL) -r requirements-torch.txt
	touch $@

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/$(PIP_INSTALL) --upgrade pip
	$(VENV)/bin/$(PIP_INSTALL) -r requirements.txt
	touch $@

# Debian's dataset-fashion-mnist package holds the demo's images; without apt
# (or root/sudo) the demo falls back to TFDS, which needs internet once.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
	  && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null; }; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi
