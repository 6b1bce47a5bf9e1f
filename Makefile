# Development tasks. `make demo` and `make test` set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build on this machine's disk (see constraints.txt).
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/revreg demo --dir $${DEMO_DIR:-.revreg-demo}

test: $(STAMP)
	$(VENV)/bin/ruff check revreg tests benchmarks
	$(VENV)/bin/ruff format --check revreg tests benchmarks
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_identity.py

clean:
	rm -rf $(VENV) .revreg-demo .pytest_cache .ruff_cache
