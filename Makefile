# The README's two commands. Both set the machine up first (Debian packages,
# kernel headers link, virtualenv), so they work on a fresh Debian 12 box.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo lint bench clean

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/mirage lab demo

lint: setup
	$(VENV)/bin/ruff check appliance tests bench
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) bench/dns.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
