"""Failure paths of the kernel layer on the real kernel: nothing outlives a failed call, and an error the kernel
reports is an error, not an empty answer.

- queue_prog.handle dups two fds: out of fds at the second (EMFILE, made real with RLIMIT_NOFILE in a forked
  child), the first must not stay open.
- a netdev queue dump for a device that went away ends with NLMSG_DONE carrying -ENODEV: xsk_queues must raise
  it, not say "no queue of that device is bound".
"""

from __future__ import annotations

import errno
import json
import os
import resource
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from xskbroker.broker import queue_prog, xdp_prog, xskdiag
from xskbroker.testbed.sandbox import VethNamespace, in_netns


def _in_child(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn() in a forked child (its rlimits and program links die with it); its result back as JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            out = fn()
        except BaseException as e:  # anything goes back to the test as text
            out, code = {"crash": repr(e)}, 1
        os.write(w, json.dumps(out).encode())
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


def _only_one_free_fd() -> int:
    """Occupy every fd number up to the highest one open, then free the last: the next fd is the only one a soft
    RLIMIT_NOFILE of the returned value allows."""
    highest = max(int(x) for x in os.listdir("/proc/self/fd"))
    while True:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        if fd > highest:
            break
    os.close(fd)
    return fd + 1


def test_a_handle_out_of_fds_at_its_second_dup_leaves_no_fd(veth: VethNamespace) -> None:
    def run() -> dict[str, Any]:
        with in_netns(veth.name):
            ifindex = socket.if_nametoindex("xsk0")
            queue_prog.attach(ifindex, "xsk0", 2, "skb").close()
            limit = _only_one_free_fd()
            before = len(os.listdir("/proc/self/fd"))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            try:
                queue_prog.handle(ifindex)
                err = 0
            except OSError as e:
                err = e.errno or 0
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            after = len(os.listdir("/proc/self/fd"))
            queue_prog.forget(ifindex)
            return {"err": err, "leaked": after - before, "attached": xdp_prog.attached(ifindex)[0]}

    out = _in_child(run)
    assert "crash" not in out, out
    assert out["err"] == errno.EMFILE, out
    assert out["leaked"] == 0, f"handle() that ran out of fds left {out['leaked']} fd(s) open"
    assert out["attached"] == 0


def test_a_queue_dump_of_a_removed_device_raises_enodev(veth: VethNamespace) -> None:
    with in_netns(veth.name):
        ifindex = socket.if_nametoindex("xsk0")
        assert xskdiag.xsk_queues(ifindex) == set()
        subprocess.run(["ip", "link", "del", "xsk0"], check=True)
        with pytest.raises(OSError) as e:
            xskdiag.xsk_queues(ifindex)
        assert e.value.errno == errno.ENODEV


def test_a_holder_read_out_of_fds_is_not_taken_for_gone() -> None:
    """kernel.holder pins the process with a pidfd, then reads its /proc status: out of fds at that read (EMFILE)
    it answered None, "not a running process", for a process that runs; the broker cannot tell then, and says so
    (grants._unpinnable: the fds, not the holder)."""
    from xskbroker.broker.kernel import LinuxKernel

    def run() -> dict[str, Any]:
        kernel = LinuxKernel()
        pid = os.getppid()  # the test's own process: running throughout
        limit = _only_one_free_fd()  # the pidfd takes it; the status file finds none
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            found = kernel.holder(pid)
            return {"found": found, "err": 0}
        except OSError as e:
            return {"found": None, "err": e.errno or 0}
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = _in_child(run)
    assert out == {"found": None, "err": errno.EMFILE}, out
