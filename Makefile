# Everything the project needs, from a fresh Debian 12 machine (as root), idempotently.
#   make demo   set up, then run `xskbroker demo`
#   make test   set up, then ruff and the whole test suite (unit + integration)
#   make bench  set up, then the benchmarks

SHELL := /bin/bash
# ip, tc and friends live in sbin, which a non-login root environment may leave off PATH
export PATH := $(PATH):/usr/local/sbin:/usr/sbin:/sbin
# What the broker and `xskbroker demo` need to run: the interpreter and its venv, libxdp/libbpf (XDP
# program loading), iproute2 (`ip netns exec` runs the broker with the namespace's own /sys), util-linux.
RUNTIME_APT_PACKAGES := python3 python3-venv libxdp1 libbpf1 iproute2 util-linux
# What only the tests need on top: QEMU and libvirt (test_qmp, test_libvirt), systemd's tools
# (systemd-socket-activate, sysusers/tmpfiles, journald).
TEST_APT_PACKAGES := qemu-system-x86 libvirt-daemon-system libvirt-clients systemd
# tests/integration/test_systemd_pid1.py boots a cached Debian tree with systemd as PID 1 (make test only)
CONTAINER_APT_PACKAGES := debootstrap systemd-container
# make bench only: the C reference consumer (bench/c/xsk_ref.c) is built against libxdp's xsk.h
BENCH_APT_PACKAGES := gcc pkg-config libxdp-dev libbpf-dev
XSK_REF := build/bench/xsk_ref
# Debian's interpreter, not one under a 0700 home: unprivileged consumers must be able to run it.
PYTHON := /usr/bin/python3
VENV := .venv
# one stamp per extra installed into the venv: the demo's (pyroute2) or the tests' (pytest, ruff, mypy, pyroute2)
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: setup setup-demo apt apt-runtime apt-bench demo test unit lint bench clean qemu

# everything the tests need (what an engineer runs once)
setup: apt $(STAMP)
# only what the demo needs to run
setup-demo: apt-runtime $(DEMO_STAMP)

# install the packages of $(1) that are missing, and nothing else (an installed one is never upgraded)
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

apt-runtime:
	$(call apt_install,$(RUNTIME_APT_PACKAGES))

apt:
	$(call apt_install,$(RUNTIME_APT_PACKAGES) $(TEST_APT_PACKAGES) $(CONTAINER_APT_PACKAGES))

apt-bench:
	$(call apt_install,$(BENCH_APT_PACKAGES))

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

$(DEMO_STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[demo]'
	touch $@

demo: setup-demo
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

# tests/integration/test_real_qemu.py runs a real af-xdp QEMU, built from Debian's source packages once per
# machine into /var/cache/xskbroker-test (about 5 minutes the first time; a no-op when it is there);
# test_real_testpmd.py a real DPDK testpmd in a trixie tree made there from Debian's binary packages
qemu: apt
	tests/realclients/build-qemu.sh >/dev/null
	tests/realclients/build-testpmd.sh >/dev/null

# two workers, a test file each at a time (a file's tests share its fixtures: the systemd container, say). The
# container's tree (debootstrap, ~45 s once per machine) is made first, not inside the suite beside other tests; a
# host that cannot make it is told so by the tests that need it
test: setup lint qemu
	$(VENV)/bin/python -c 'from xskbroker.testbed import container as c; c.host_missing() or c.build_tree()' \
	  || echo "note: the systemd container's tree could not be made now; its tests will say why"
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile

$(XSK_REF): bench/c/xsk_ref.c | apt-bench
	mkdir -p $(dir $@)
	cc -O2 -Wall -Wextra -o $@ $< $$(pkg-config --cflags --libs libxdp libbpf)

bench: setup $(XSK_REF)
	$(VENV)/bin/python -m pip install -q -e '.[test,bench]'
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
