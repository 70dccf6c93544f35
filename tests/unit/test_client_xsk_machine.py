"""The rings' index protocol relies on x86 memory order: other CPUs are refused before anything is mapped."""

from __future__ import annotations

import os
import platform

import pytest

from xskbroker.client.xsk import UnsupportedMachine, XskSocket, check_machine
from xskbroker.wire.protocol import Geometry


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64", "s390x", ""])
def test_a_weakly_ordered_cpu_is_refused_and_the_fds_stay_the_callers(monkeypatch: pytest.MonkeyPatch,
                                                                       machine: str) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    r, w = os.pipe()  # not sockets at all: the refusal comes before either fd is used
    try:
        with pytest.raises(UnsupportedMachine, match="x86 memory ordering"):
            XskSocket(r, w, 0, Geometry())
        os.fstat(r), os.fstat(w)  # both still open
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("machine", ["x86_64", "AMD64", "i686", "i386"])
def test_x86_runs(monkeypatch: pytest.MonkeyPatch, machine: str) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    check_machine()
