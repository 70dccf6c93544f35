"""`xskbroker doctor` on this machine, in a private namespace with a veth pair: the real facts it reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, readable_copy, spawn_unprivileged

from .conftest import CONSUMER_UID, POLICY
from .consumers import try_grant


def _doctor(netns: str, *args: str, prefix: tuple[str, ...] = (), python: str = sys.executable,
            env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    cmd = ["ip", "netns", "exec", netns, *prefix, python, "-m", "xskbroker.broker.cli", "doctor", "--json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert proc.stderr == "", proc.stderr
    report = json.loads(proc.stdout)
    assert report["exit"] == proc.returncode
    return proc.returncode, report


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def _ip_link(netns: str, dev: str) -> str:
    return subprocess.run(["ip", "-n", netns, "-d", "link", "show", dev], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture
def wide_veth() -> Iterator[VethNamespace]:
    from .conftest import ns_name
    with VethNamespace(ns_name(), queues=2) as v:
        yield v


def test_doctor_reports_this_machine_before_and_after_a_grant(wide_veth: VethNamespace) -> None:
    veth = wide_veth
    with BrokerProcess(veth.name, POLICY.format(uid=CONSUMER_UID)) as b:
        where = ("--interface", veth.inside, "--socket", b.socket_path, "--policy", b.policy_path)
        link_before = _ip_link(veth.name, veth.inside)
        code, before = _doctor(veth.name, *where)
        assert _ip_link(veth.name, veth.inside) == link_before  # it changed nothing
        got = spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()
        assert got["ok"] is True, got
        code_after, after = _doctor(veth.name, *where)

    checks, later = _by_name(before), _by_name(after)
    name = f"iface.{veth.inside}"
    # the facts of this machine: veth has native XDP, no zero-copy; the pair was made with two queues
    assert checks[f"{name}.queues"]["facts"]["queues"] == 2
    assert checks[f"{name}.xdp"]["status"] == "ok" and checks[f"{name}.xdp"]["facts"]["native"] is True
    assert checks[f"{name}.xdp"]["facts"]["driver"] == "veth"
    zc = checks[f"{name}.zerocopy"]
    assert zc["status"] == "degraded" and zc["facts"]["zerocopy"] is False and zc["fix"]
    # nothing attached before the first grant; the broker's XSK program after it
    assert checks[f"{name}.program"]["facts"]["owner"] == "none"
    prog = later[f"{name}.program"]
    assert prog["status"] == "ok" and prog["facts"]["owner"] == "ours" and prog["facts"]["prog_id"] > 0
    assert prog["facts"]["mode"] in ("native", "skb")
    # the broker answers, and its own memlock is read from it
    assert checks["socket"]["status"] == "ok" and checks["socket"]["facts"]["pid"] == b.proc.pid  # type: ignore[union-attr]
    assert checks["memlock.broker"]["facts"]["pid"] == b.proc.pid  # type: ignore[union-attr]
    assert checks["policy"]["status"] == "ok" and checks["policy"]["facts"]["rules"] == 2
    for k in ("kernel.af_xdp", "kernel.bindtodevice", "kernel.peerpidfd", "bpf", "libs", "xsk_program"):
        assert checks[k]["status"] == "ok", checks[k]
    # memlock: what is true here, with a fix when it limits anything
    here = _limits()
    mem = checks["memlock.consumer"]
    assert (mem["facts"]["soft"], mem["facts"]["hard"]) == here
    if here[0] is not None and here[0] < 32 << 20 and not checks["memlock.broker"]["facts"]["sys_resource"]:
        assert mem["status"] == "degraded" and "CAP_SYS_RESOURCE" in mem["found"] and mem["fix"]
    # no zero-copy on veth: never "ready"; only the named interface's problems could make it unusable
    assert code == 1 and before["verdict"] == "degraded", before
    assert code_after == 1


def _limits() -> tuple[int | None, int | None]:
    text = Path("/proc/self/limits").read_text()
    line = next(x for x in text.splitlines() if x.startswith("Max locked memory"))
    soft, hard = line.split()[3:5]
    return tuple(None if v == "unlimited" else int(v) for v in (soft, hard))  # type: ignore[return-value]


def test_doctor_as_an_unprivileged_user_says_what_it_cannot_see(wide_veth: VethNamespace) -> None:
    veth = wide_veth
    work = Path(tempfile.mkdtemp(prefix="xsk12d-"))
    try:
        os.chmod(work, 0o755)
        code_dir = readable_copy(work / "code")
        with BrokerProcess(veth.name, POLICY.format(uid=CONSUMER_UID)) as b:
            assert spawn_unprivileged(try_grant, b.socket_path, veth.inside, [0], uid=CONSUMER_UID).result()["ok"]
            prefix = ("setpriv", f"--reuid={CONSUMER_UID}", f"--regid={CONSUMER_UID}", "--clear-groups")
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(code_dir)}
            code, report = _doctor(veth.name, "--interface", veth.inside, "--socket", b.socket_path,
                                   "--policy", b.policy_path, prefix=prefix, python=os.path.realpath(sys.executable),
                                   env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert report["uid"] == CONSUMER_UID
    checks = _by_name(report)
    # what needs privilege is reported as not visible, not as a failure
    assert checks["kernel.af_xdp"]["status"] == "unknown"
    assert checks["bpf"]["status"] == "unknown"
    assert checks[f"iface.{veth.inside}.program"]["status"] == "unknown"  # an attached program it may not open
    assert checks[f"iface.{veth.inside}.program"]["facts"]["prog_id"] > 0
    # what anyone may see is there: the interface's facts, the broker's answer and its limits
    assert checks[f"iface.{veth.inside}.queues"]["facts"]["queues"] == 2
    assert checks[f"iface.{veth.inside}.xdp"]["facts"]["native"] is True
    assert checks["socket"]["status"] == "ok"
    assert "pid" in checks["memlock.broker"]["facts"]
    assert not [c for c in report["checks"] if c["status"] == "unusable"], report
    assert code == 1
