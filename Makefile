# hostagent: build, run and test. Every target installs what it needs first;
# the install steps are idempotent (a second run only checks, in well under 1 s).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STATE_DIR ?= var
PORT ?= 54321

# Debian packages: what the agent drives at run time, and what the test tiers
# add (a target daemon, an NFS server and the User-Mode Linux lab guest).
RUN_DEBS := lvm2 qemu-utils xfsprogs e2fsprogs util-linux nfs-common open-iscsi \
	multipath-tools sanlock uuid-runtime
TEST_DEBS := $(RUN_DEBS) tgt python3-sanlock nfs-kernel-server libiscsi-bin \
	user-mode-linux busybox-static gcc libc6-dev fuse3 libfuse3-dev qemu-block-extra \
	systemd systemd-container qemu-system-common

.PHONY: all venv deps-run deps-test run test test-unit test-host test-lab lint bench clean

all: venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
		| grep -v 'is ignored: it is neither' || true
	@$(BIN)/python -c 'import agent, rpc, aiohttp, jsonrpcserver, pytest_asyncio'
	@touch $@

venv: $(STAMP)

deps-run:
	@bash tests/install-debs.sh $(RUN_DEBS)

deps-test:
	@bash tests/install-debs.sh $(TEST_DEBS)
	@bash tests/lab/vm/install.sh

run: venv deps-run
	$(BIN)/hostagentd --dev --state-dir $(STATE_DIR) --port $(PORT)

test: venv deps-test
	@TIERS_PARALLEL=1 bash tests/run-tiers.sh unit host lab

test-unit: venv
	@bash tests/run-tiers.sh unit

test-host: venv deps-test
	@bash tests/run-tiers.sh host

test-lab: venv deps-test
	@bash tests/run-tiers.sh lab

lint: venv
	$(BIN)/ruff check agent rpc storage ovfstore tests
	$(BIN)/mypy
	$(BIN)/python -m tests.importgraph
	$(BIN)/python -m tests.sizes

bench: venv deps-test
	$(BIN)/python -m tests.bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# A Debian package of the agent (debian/), built from a copy of the checkout
# (tracked and new files, not what .gitignore names) so that
# dpkg-buildpackage writes nothing beside the checkout: build/hostagent_*.deb.
DEB_BUILD_DEBS := dpkg-dev debhelper dh-python fakeroot python3-pip python3-attr \
	python3-cryptography python3-defusedxml python3-frozenlist python3-idna \
	python3-jsonschema python3-multidict python3-prometheus-client python3-psutil \
	python3-pyudev python3-typing-extensions
.PHONY: deb
deb:
	@bash tests/install-debs.sh $(DEB_BUILD_DEBS)
	rm -rf build/deb && mkdir -p build/deb/src
	git ls-files -z --cached --others --exclude-standard \
		| tar -c --null -T - -f - | tar -x -C build/deb/src
	cd build/deb/src && dpkg-buildpackage -b -us -uc
	rm -f build/hostagent_*.deb && cp build/deb/hostagent_*.deb build/
	@ls build/hostagent_*.deb
