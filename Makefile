# Quick start: `make demo` runs the offline demo, `make test` runs the tests.
# Both create the virtual environment and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
# Runs as root directly, else through sudo when it is available.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup data

demo: setup data
	$(PY) main.py $(ARGS)

test: setup data
	$(PY) -m pytest -q tests $(ARGS)

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
