"""Who may import whom, checked in fresh interpreters: each module is imported alone and what it loaded is
compared with the rules.

- the broker never imports the client, nor the test beds;
- the client never imports the broker (it runs unprivileged and must not even load privileged code);
- the kernel layer imports neither the wiring (service, server, daemon, cli) nor the policy;
- the policy and the wire module import nothing of ours (the policy may use only itself), but for
  common.records (dataclasses' replacement, itself importing nothing of ours);
- installing the wheel adds one top-level import name, xskbroker.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import xskbroker.broker
import xskbroker.client
import xskbroker.policy
import xskbroker.wire

ROOT = Path(__file__).resolve().parents[2]
KERNEL_LAYER = ("bpf", "bpfsys", "queue_prog", "pins", "xsk", "netdev", "netlink", "xdp_prog", "linkwatch",
                "umem_pool", "xskdiag", "closer", "peer", "kernel",
                "preparer", "sent_copies", "helper_process")
WIRING = ("service", "server", "daemon", "cli", "leases", "squat", "workers", "grants", "boundgrants", "baregrants",
          "mapgrants", "lifecycle", "core", "holders")
REPORT = ("import sys, json; print(json.dumps(sorted(m for m in sys.modules "
          "if m.startswith('xskbroker.'))))")


def _loaded_by(module: str, then: str = "pass") -> list[str]:
    # a fresh interpreter: this test process has loaded everything already
    proc = subprocess.run([sys.executable, "-c", f"import {module}; {then}; {REPORT}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [m for m in json.loads(proc.stdout) if m != module]


def _modules(package: object, prefix: str) -> list[str]:
    names = pkgutil.walk_packages(package.__path__, prefix)  # type: ignore[attr-defined]
    return sorted(m.name for m in names if not m.name.endswith("__main__"))  # those run a command when imported


def _under(loaded: list[str], *prefixes: str) -> list[str]:
    return [m for m in loaded if any(m == p or m.startswith(p + ".") for p in prefixes)]


# broker.cli is the one command line: it registers the client's subcommands and the demo, lazily (the
# daemon's own path is checked by test_serving_loads_no_client_code)
@pytest.mark.parametrize("module", [m for m in _modules(xskbroker.broker, "xskbroker.broker.")
                                    if m != "xskbroker.broker.cli"])
def test_the_broker_imports_neither_the_client_nor_the_test_beds(module: str) -> None:
    bad = _under(_loaded_by(module), "xskbroker.client", "xskbroker.testbed")
    assert not bad, f"{module} pulled in {bad}"


def test_serving_loads_no_client_code() -> None:
    bad = _under(_loaded_by("xskbroker.broker.daemon"), "xskbroker.client", "xskbroker.testbed")
    assert not bad, f"the daemon pulled in {bad}"


def test_the_serve_commands_options_load_no_client_code() -> None:
    """`xskbroker serve` reads its command line from serve_options' table, whose socket default the clients share:
    taken from the client's connection module, it cost every cold start that module and its package."""
    loaded = _loaded_by("xskbroker.broker.serve_options", "xskbroker.broker.serve_options.options()")
    bad = _under(loaded, "xskbroker.client", "xskbroker.testbed")
    assert not bad, f"serve's options pulled in {bad}"


@pytest.mark.parametrize("module", _modules(xskbroker.client, "xskbroker.client."))
def test_the_client_imports_nothing_of_the_broker(module: str) -> None:
    bad = _under(_loaded_by(module), "xskbroker.broker")
    assert not bad, f"{module} pulled in privileged modules: {bad}"


@pytest.mark.parametrize("name", KERNEL_LAYER)
def test_the_kernel_layer_imports_neither_wiring_nor_policy(name: str) -> None:
    loaded = _loaded_by(f"xskbroker.broker.{name}")
    bad = _under(loaded, "xskbroker.policy", *(f"xskbroker.broker.{w}" for w in WIRING))
    assert not bad, f"kernel layer module {name} pulled in {bad}"


@pytest.mark.parametrize("module", [*_modules(xskbroker.policy, "xskbroker.policy."),
                                    *_modules(xskbroker.wire, "xskbroker.wire.")])
def test_policy_and_wire_import_nothing_of_ours(module: str) -> None:
    own = module.split(".")[1]
    bad = [m for m in _loaded_by(module) if not m.startswith(f"xskbroker.{own}") and m not in RECORDS]
    assert not bad, f"{module} pulled in {bad}"


RECORDS = ("xskbroker.common", "xskbroker.common.records")  # what policy and wire may use besides themselves


def test_records_import_nothing_of_ours() -> None:
    assert _loaded_by("xskbroker.common.records") == ["xskbroker.common"]


def test_the_wheel_adds_one_top_level_name(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("xskbroker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"xskbroker"}, tops
    for sub in ("broker/daemon.py", "client/grant.py", "policy/decide.py", "wire/protocol.py"):
        assert f"xskbroker/{sub}" in names
