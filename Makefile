# `make demo` and `make test` work on a fresh machine: each creates .venv if missing and
# installs what it needs first.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.hasten-installed
# CPU machines: install the pinned CPU torch wheel first (an unpinned torch pulls a CUDA build).
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test install browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Debian's Chromium drives the Gradio app tests (Playwright, no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: browser tests will be skipped (install Debian's chromium)"; fi; }

# Tiny Flux at 256x256: a 64x64 latent grid, big enough for 16x16 groups to be sparse.
demo: $(STAMP)
	$(VENV)/bin/hasten generate --compare --height 256 --width 256

test: $(STAMP) browser
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
