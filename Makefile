# One-command set-up on a fresh machine: `make demo` (install + the main job), `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

# Compress and decompress an image with the bundled checkpoint, next to JPEG and WebP (IMAGE=path to choose one).
demo: $(STAMP)
	$(PY) demo.py $(if $(IMAGE),--image $(IMAGE))

# The default test suite (CI runs this).
test: $(STAMP)
	$(PY) -m pytest -q

# Everything, slow tests included.
test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	$(PY) scripts/bench_scan.py

clean:
	rm -rf $(VENV) .pytest_cache
