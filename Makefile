# Airlock: `make run` serves, `make test` tests. Everything installs into .venv from uv.lock.
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
VENV := .venv
# The GPU engine where nvidia-smi sees a GPU, else the CPU engine (override: make run ENGINE=cpu).
ENGINE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install browser run test lint bench bench-fairness clean

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

install: $(UV)
	$(UV) sync --frozen --python $(PYTHON) --extra $(ENGINE)

run: install
	$(VENV)/bin/airlock up $(ARGS)

test: install browser
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The console tests drive Debian's Chromium (Playwright's own browser downloads are never used).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null; } || \
		{ echo "the console tests need Debian's chromium: sudo apt-get install chromium" >&2; exit 1; }

# What the gateway costs, side by side with the same load straight upstream (see README, Performance).
bench: install
	$(VENV)/bin/python -m tests.bench.run $(ARGS)

# User B's time to first token while user A floods: through Airlock's fair queue and straight to vLLM.
bench-fairness: install
	$(VENV)/bin/python -m tests.bench.fairness $(ARGS)

lint: install
	$(VENV)/bin/ruff check server tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
