"""/proc/<pid>/status parsing and pidfds, read from this very process (the kernel's own text)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xskbroker.common.procfs import has_cap, pidfd_open, status_fields, status_ids

CAP_SYS_ADMIN = 21
STATUS = "Name:\tqemu\nUid:\t1000\t1001\t1002\t1003\nGid:\t10\t11\t12\t13\nCapEff:\t0000000000200000\nCapPrm:\t0\n"


def test_the_fields_of_this_processes_status_are_the_os_modules_answers() -> None:
    with open("/proc/self/status") as f:
        text = f.read()
    assert status_fields(text)["Pid"] == str(os.getpid())
    assert status_ids(text) == (os.getuid(), os.geteuid(), *os.getresuid()[2:], os.geteuid())
    assert status_ids(text, "Gid")[:2] == (os.getgid(), os.getegid())


def test_ids_in_order_real_effective_saved_fs() -> None:
    assert status_ids(STATUS) == (1000, 1001, 1002, 1003)
    assert status_ids(STATUS, "Gid") == (10, 11, 12, 13)
    with pytest.raises(ValueError, match="no Uid line"):
        status_ids("Name:\tx\n")


def test_capabilities_by_number_and_set() -> None:
    assert has_cap(STATUS, CAP_SYS_ADMIN)
    assert not has_cap(STATUS, CAP_SYS_ADMIN - 1)
    assert not has_cap(STATUS, CAP_SYS_ADMIN, "CapPrm")
    assert not has_cap(STATUS, CAP_SYS_ADMIN, "CapBnd")  # no such line: not held


def test_pidfd_open_gives_none_for_a_reaped_process() -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    gone = int(child.stdout)
    fd = pidfd_open(os.getpid())
    assert fd is not None
    os.close(fd)
    if os.path.exists(f"/proc/{gone}"):  # the pid was reused already: nothing to learn
        pytest.skip("pid reused")
    assert pidfd_open(gone) is None
