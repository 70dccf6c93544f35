"""A per-queue program attach that fails after its link is made leaves nothing behind.

The link holds the program on the interface: if the step after it (reading the program's id) fails, the
link must be closed with the maps and the program, or the interface keeps a program no record names (the
next grant there sees a foreign program) and the broker an fd per try.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest

from xskbroker.broker import queue_prog, xdp_prog
from xskbroker.testbed.sandbox import VethNamespace, in_netns


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_failure_after_the_link_is_made_detaches_and_closes_everything(
        veth: VethNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_info(fd: int) -> object:
        raise OSError(errno.ENOMEM, "prog_info failed (injected)")

    monkeypatch.setattr(queue_prog.bpf, "prog_info", failing_info)
    with in_netns(veth.name):
        ifindex = socket.if_nametoindex("xsk0")
        before = _fds()
        for _ in range(3):
            with pytest.raises(OSError, match="injected"):
                queue_prog.attach(ifindex, "xsk0", 2, "skb")
        assert _fds() - before == set(), "an attach that failed left fds open"
        assert xdp_prog.attached(ifindex) == (0, None), "an attach that failed left its program linked"
        assert ifindex not in queue_prog._links
        monkeypatch.undo()
        # and the interface is clean for the next attach, which works
        handle = queue_prog.attach(ifindex, "xsk0", 2, "skb")
        try:
            prog_id, mode = xdp_prog.attached(ifindex)
            assert prog_id > 0 and queue_prog.ours(ifindex, prog_id) and mode == "skb"
        finally:
            handle.close()
            queue_prog.forget(ifindex)
        assert xdp_prog.attached(ifindex) == (0, None)
