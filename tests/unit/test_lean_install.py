"""A lean install: `make demo` asks apt and pip for the runtime only, pyroute2 stays off the daemon's path, and the
package metadata carries an SPDX license string."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_ONLY = {"qemu-system-x86", "libvirt-daemon-system", "libvirt-clients", "systemd"}


def dry_run(target: str) -> str:
    """What `make TARGET` would run, without running it (-B: as on a fresh clone, every stamp out of date)."""
    done = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), target], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def apt_packages(commands: str) -> set[str]:
    """Every package the apt steps consider (they install those of the list that are missing)."""
    return {p for line in re.findall(r"for p in ([^;]*);", commands) for p in line.split()}


def test_make_demo_installs_the_runtime_only() -> None:
    demo = dry_run("demo")
    packages = apt_packages(demo)
    assert {"python3", "python3-venv", "libxdp1", "libbpf1", "iproute2"} <= packages
    assert not packages & TEST_ONLY, packages & TEST_ONLY
    assert "'.[demo]'" in demo and "[test" not in demo


def test_make_test_still_installs_what_the_tests_need() -> None:
    test = dry_run("test")
    assert TEST_ONLY | apt_packages(dry_run("demo")) <= apt_packages(test)
    assert "'.[test]'" in test


def test_pyroute2_is_a_test_bed_dependency_and_never_loaded_by_the_daemon() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["dependencies"] == []  # the broker itself needs nothing from PyPI
    extras = meta["optional-dependencies"]
    for extra in ("demo", "test"):
        assert any(d.startswith("pyroute2") for d in extras[extra]), extra
    report = "import sys, json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2')))"
    for module in ("xskbroker.broker.daemon", "xskbroker.broker.cli", "xskbroker.testbed.demo"):
        done = subprocess.run([sys.executable, "-c", f"import {module}; {report}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == [], f"{module} loaded pyroute2"


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"
    (requires,) = meta["build-system"]["requires"]
    assert requires == "setuptools>=77"  # the first that takes an SPDX expression
