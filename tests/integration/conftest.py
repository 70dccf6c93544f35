"""Integration fixtures: a private namespace with a veth pair and a broker in it, all really made.

Needs root and a kernel with AF_XDP and BPF; without them the whole directory is skipped with the reason.
"""

from __future__ import annotations

import atexit
import ctypes.util
import functools
import itertools
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, readable_copy

CONSUMER_UID = 65534  # nobody: allowed by the test policy
STRANGER_UID = 65533  # no rule names it

# For processes exec'ed as another uid: the clone, and the .venv in it, may sit under a directory that uid
# cannot enter (a 0700 home, a mktemp -d), so they run Debian's interpreter on a readable copy of the code.
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else os.path.realpath(sys.executable)


@functools.cache
def readable_code() -> Path:
    """The xskbroker package copied where any uid can read it, once per session: put it on PYTHONPATH."""
    where = Path(tempfile.mkdtemp(prefix="xskbroker-code-"))
    atexit.register(shutil.rmtree, where, True)
    return readable_copy(where)

POLICY = """\
version = 1

[[allow]]
name = "tests"
users = [{uid}]
interfaces = ["xsk*"]
queues = ["0-7"]
kinds = ["bound"]
max_queues = 2
max_umem = "16MiB"

[[deny]]
name = "never-the-peer"
users = ["*"]
interfaces = ["*p"]
"""


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces, XDP, AF_XDP)"
    try:
        socket.socket(44, socket.SOCK_RAW).close()
    except OSError as e:
        return f"this kernel cannot make AF_XDP sockets: {e}"
    if not ctypes.util.find_library("xdp"):
        return "libxdp is not installed (apt-get install libxdp1)"
    if not os.path.exists("/usr/sbin/ip") and not os.path.exists("/sbin/ip"):
        return "iproute2 is not installed"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing()
    if reason:
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=reason))


_ids = itertools.count()


def cpu_list(text: str) -> frozenset[int]:
    """A kernel CPU list ("0-2,5") as a set."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def ns_name() -> str:
    # XSKT_NS_PREFIX: runs sharing a machine tell their namespaces apart (and clean up only theirs)
    return f"{os.environ.get('XSKT_NS_PREFIX', 'xskt')}{os.getpid()}-{next(_ids)}"


@pytest.fixture
def veth() -> Iterator[VethNamespace]:
    """Two queues on each end, so tests can aim traffic at queue 0 or 1."""
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2) as ns:
        yield ns


@pytest.fixture
def base() -> Iterator[str]:
    """A root-owned 0755 directory under /tmp (others may enter it, as DPDK must reach a socket in it)."""
    d = tempfile.mkdtemp(prefix="xd-", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def broker(veth: VethNamespace) -> Iterator[BrokerProcess]:
    with BrokerProcess(veth.name, POLICY.format(uid=CONSUMER_UID)) as b:
        yield b
        assert b.proc is not None and b.proc.poll() is None, f"broker died:\n{b.log()}"


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")
