# `make demo` and `make test` work on a fresh machine: each creates .venv if missing and
# installs the locked versions (requirements/lock.txt) first, so every machine gets the
# environment the suite last passed with.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.hasten-installed
LOCK    := requirements/lock.txt
# CPU machines: the pinned CPU torch wheel first (an unpinned torch pulls a CUDA build), and
# the CPU-only pins (triton; on CUDA machines torch pins its own).
TORCH_CPU ?= torch==2.13.0
GPU     := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
CPU_LOCK := $(if $(GPU),,-c requirements/lock-cpu.txt)
# `make test-latest`: the newest releases pyproject.toml allows, in a venv of its own.
LATEST  ?= .venv-latest

.PHONY: demo test test-latest lock install browser clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) requirements/lock-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip
	$(if $(GPU),,$(PY) -m pip install -q -c $(LOCK) "$(TORCH_CPU)")
	$(PY) -m pip install -q -c $(LOCK) $(CPU_LOCK) -e '.[test]'
	touch $(STAMP)

# Debian's Chromium drives the Gradio app tests (Playwright, no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: browser tests will be skipped (install Debian's chromium)"; fi; }

# The trained FLUX micro-world at 192x192, the canvas it draws on (docs/microworld.md).
demo: $(STAMP)
	$(VENV)/bin/hasten generate --compare   # the trained FLUX micro-world: dense | GRAT | difference in outputs/hasten-side.png

# Lint and format check first (seconds), then the tests and every docstring example (10-15 min on 2 CPU cores).
test: $(STAMP) browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests --doctest-modules src/hasten --durations=15   # the slowest tests, to keep the suite short

# The suite on the newest releases pyproject.toml allows (not the lock): run it when upstream
# publishes (transformers, diffusers, gradio, ...) before moving the lock (`make lock`).
# CPU machines keep the local CPU torch wheel.
test-latest: browser
	test -x $(LATEST)/bin/python || python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	echo "$(if $(GPU),,$(TORCH_CPU))" > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
	  -c $(LATEST)/torch-constraint.txt -e '.[test]'
	$(LATEST)/bin/python -c "import torch, transformers, diffusers, gradio; print('latest: torch', \
	  torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, \
	  'gradio', gradio.__version__)"
	$(LATEST)/bin/python -m pytest -q tests --doctest-modules src/hasten

# Rewrite the lock from .venv (after upgrading it and seeing `make test` pass).
lock: $(STAMP)
	{ sed -n '/^#/p' $(LOCK); $(PY) -m pip freeze --all --exclude-editable \
	  | grep -viE '^(torch|triton|nvidia-|hasten)([=@ ]|$$)'; \
	  $(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])"; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) build src/*.egg-info .pytest_cache
