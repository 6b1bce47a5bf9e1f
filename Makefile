# Development tasks. `make demo` and `make test` set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench clean browser

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

# The audit-report test renders HTML in Debian's Chromium; install it where we can (root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: chromium is not installed; the browser test skips (and fails under CI)"

test: $(STAMP) browser
	$(VENV)/bin/ruff check revreg tests benchmarks fuzz examples
	$(VENV)/bin/ruff format --check revreg tests benchmarks fuzz examples
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q

# The same without the tests marked slow (crash campaigns, workers, long fuzz budgets): for the edit loop.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check revreg tests benchmarks fuzz examples
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_identity.py
	$(PY) benchmarks/bench_registry.py
	$(PY) benchmarks/bench_verifier.py
	$(PY) benchmarks/bench_server.py
	$(PY) benchmarks/bench_scale.py

clean:
	rm -rf $(VENV) .revreg-demo .pytest_cache .ruff_cache
