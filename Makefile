# Quick start: `make demo` runs the offline demo, `make test` runs the tests.
# Both create the virtual environment and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
# Runs as root directly, else through sudo when it is available.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-torch setup data tensorboard

demo: setup data
	$(PY) main.py $(ARGS)

test: setup data
	$(PY) -m pytest -q tests $(ARGS)

# TensorBoard on the runs' event files (every seed_N/ below LOGDIR);
# e.g. make tensorboard LOGDIR=runs/fmnist ARGS="--port 6007 --bind_all".
LOGDIR ?= runs
tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(LOGDIR) $(ARGS)

# The torchvision parity tests, the PyTorch reference's quantizer against
# dtq_jax.quant and the full-resolution paper settings (torch writes their
# .pth weights), in a separate environment because the torch build is large
# (about 5.5 GB with its CUDA libraries; it runs on the CPU).
TORCH_VENV ?= .venv-torch
test-torch: $(TORCH_VENV)/.installed
	$(TORCH_VENV)/bin/python -m pytest -q tests/test_pretrained.py \
	  tests/test_torch_reference.py tests/test_paper_smoke.py $(ARGS)

$(TORCH_VENV)/.installed: requirements.txt requirements-torch.txt
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q --upgrade pip
	$(TORCH_VENV)/bin/pip install -q -r requirements.txt -r requirements-torch.txt
	touch $@

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

# Debian's dataset-fashion-mnist package holds the demo's images; without apt
# (or root/sudo) the demo falls back to TFDS, which needs internet once.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
	  && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null; }; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi
