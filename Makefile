# Everything the project needs, from a fresh Debian 12 machine (as root), idempotently.
#   make demo   set up, then run `xskbroker demo`
#   make test   set up, then ruff and the whole test suite (unit + integration)
#   make bench  set up, then the benchmarks

SHELL := /bin/bash
# ip, tc and friends live in sbin, which a non-login root environment may leave off PATH
export PATH := $(PATH):/usr/local/sbin:/usr/sbin:/sbin
# tests/integration/test_systemd_pid1.py boots a cached Debian tree with systemd as PID 1 (make test only)
CONTAINER_APT_PACKAGES := debootstrap systemd-container
APT_PACKAGES := python3 python3-venv libxdp1 libbpf1 iproute2 qemu-system-x86 systemd util-linux python3-systemd libvirt-daemon-system libvirt-clients
# Debian's interpreter, not one under a 0700 home: unprivileged consumers must be able to run it.
PYTHON := /usr/bin/python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup apt demo test unit lint bench clean

setup: apt $(STAMP)

apt:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/xskbroker demo

# mypy checks the installed names (xskbroker.broker, ...): the top-level folders are linked under them
TYPECHECK := build/typecheck/xskbroker
lint: setup
	$(VENV)/bin/ruff check .
	mkdir -p $(TYPECHECK)
	ln -sfn ../../../xskbroker/__init__.py $(TYPECHECK)/__init__.py
	for d in broker client common policy testbed wire; do ln -sfn ../../../$$d $(TYPECHECK)/$$d; done
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/python -m pytest tests/unit

test: setup lint
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(CONTAINER_APT_PACKAGES)"
	$(VENV)/bin/python -m pytest

bench: setup
	$(VENV)/bin/python -m pip install -q -e '.[test,bench]'
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
