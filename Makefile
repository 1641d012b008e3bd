# The README's two commands. Both set the machine up first (Debian packages,
# kernel headers link, virtualenv), so they work on a fresh Debian 12 box.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo lint bench soak fuzz clean

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/mirage lab demo

lint: setup
	$(VENV)/bin/ruff check appliance tests bench
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

# Benchmarks print numbers and ratios against a baseline run side by side;
# they are never part of `make test` (shared, noisy machines). A bench that
# misses its target exits 1; the `-` lets the others still run and print.
bench: setup
	-$(PY) bench/pool_memory.py
	-$(PY) bench/dns.py
	-$(PY) bench/gateway.py
	-$(PY) bench/udp.py
	-$(PY) bench/capture.py
	-$(PY) bench/rules.py
	-$(PY) bench/tls13_records.py
	-$(PY) bench/protocols.py

# The 10-minute soak (bench/soak.py): mixed DNS/TCP/UDP from three LAN
# clients while a small fake range recycles; judged on broken flows, fd and
# RSS growth. `make test` runs a 12-second smoke of it.
soak: setup
	$(PY) bench/soak.py

# The fuzz budget's properties (tests/unit/test_fuzz_budget.py: DNS handler
# and wire, SOCKS5 server, HTTP proxy parser, config loader) with many more
# examples than `make test` runs (hypothesis profile `mirage-fuzz`, about
# 20,000 per property); `make test` runs a smoke of this target.
FUZZ_PROFILE ?= mirage-fuzz
fuzz: setup
	MIRAGE_FUZZ_PROFILE=$(FUZZ_PROFILE) $(PY) -m pytest -q -p no:cacheprovider --timeout=0 tests/unit/test_fuzz_budget.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
