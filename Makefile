# make demo   the whole network and a prompt through it (real Ollama if one answers, else the simulator)
# make test   install what the tests need and run them
# make bench  the relay benchmark (bench/README in the main README)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench docker-tools clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) scripts/demo.py

# docker-compose (Debian's package) checks docker-compose.yml statically; installed when missing and root.
docker-tools:
	@command -v docker-compose >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
		|| echo "note: docker-compose not installed; the compose-file test needs it (apt-get install docker-compose)"; }

test: $(VENV)/.dev docker-tools
	$(PY) -m pytest

bench: $(VENV)/.dev
	$(PY) bench/relay_bench.py

clean:
	rm -rf $(VENV) .pytest_cache bench/results
