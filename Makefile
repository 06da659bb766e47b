# make demo   the whole network and a prompt through it (real Ollama if one answers, else the simulator)
# make demo-settle  the same, paid through a local chain (anvil): deposit, jobs, ledger, epoch, claim
# make test   install what the tests need and run them
# make bench  the relay, library floors, cluster (two clusters), multi-turn, chaos, capacity, proofs, audits, settlement and resume benchmarks (docs/performance.md)
# make docs   the docs site (docs/, mkdocs.yml) into .venv/site
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-settle test bench docs test-tools clean contracts

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) scripts/demo.py

# The demo paid through a local chain (anvil): a deposit, jobs, the ledger, an epoch settled, a claim.
demo-settle: $(VENV)/.runtime contracts/node_modules/.installed
	$(PY) scripts/demo.py --settle

# Debian's docker-compose checks docker-compose.yml statically; nginx is the benchmarks' floor and baseline;
# chromium runs the dashboard's browser test; redis-server is shared state's real Redis (each test starts
# its own on a free port). Installed when missing and root.
TOOLS := docker-compose nginx chromium redis-server
test-tools:
	@missing=""; for t in $(TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
		|| echo "note:$$missing not installed; the tests that need them say so (apt-get install$$missing)"; }

# The escrow contract's toolchain from npm (contracts/package-lock.json): solc-js compiles it, anvil is
# the local chain the settlement tests run against, OpenZeppelin's contracts are its libraries.
contracts/node_modules/.installed: contracts/package-lock.json
	cd contracts && npm ci --no-audit --no-fund --loglevel=error
	touch $@

contracts: contracts/node_modules/.installed
	cd contracts && node compile.mjs

# Ollama's JavaScript library (tests/js/package-lock.json): its clients must work pointed at the operator.
tests/js/node_modules/.installed: tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Three processes for most tests (they wait on sockets and timers); the heavy, timed ones alone after.
test: $(VENV)/.dev test-tools contracts/node_modules/.installed tests/js/node_modules/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest -n 3 -m "not solo"
	$(PY) -m pytest -m solo

docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

bench: $(VENV)/.dev test-tools contracts/node_modules/.installed
	$(PY) bench/relay_bench.py
	$(PY) bench/floors.py
	$(PY) bench/cluster_bench.py --cluster default
	$(PY) bench/cluster_bench.py --cluster second
	$(PY) bench/multiturn_bench.py
	$(PY) bench/chaos_bench.py
	$(PY) bench/capacity_bench.py
	$(PY) bench/proofs_bench.py
	$(PY) bench/audits_bench.py
	$(PY) bench/settlement_bench.py
	$(PY) bench/resume_bench.py

clean:
	rm -rf $(VENV) .pytest_cache bench/results
