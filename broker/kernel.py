"""The kernel work the service asks for, behind one interface: the service decides, a Kernel acts.

`Kernel` is the whole surface the wiring (broker.service and its parts) uses: interfaces, XDP programs and
their xsks_map, AF_XDP sockets, and the few process facts a grant needs (a holder's identity, its memlock
limits). `LinuxKernel` delegates to the kernel-layer modules (netdev, xdp_prog, bpf, xsk, xskdiag, procfs);
the unit tests pass a fake that records what it made and closed. The errors the service tells apart are
the kernel layer's own, re-exported here so the wiring imports them from one place.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from xskbroker.broker import bpf, netdev, pins, queue_prog, xdp_prog, xsk, xskdiag
from xskbroker.common.procfs import is_process, memlock_limits, pidfd_ino, pidfd_open, pinned_start, status_ids
from xskbroker.wire.protocol import Geometry

NoSuchInterface = netdev.NoSuchInterface
NotCanonical = netdev.NotCanonical
ForeignProgram = xdp_prog.ForeignProgram
bpf_blocked = xdp_prog.bpf_blocked  # a seccomp filter refuses bpf(2) here: what an EPERM from attach means
QueueBusy = xsk.QueueBusy
BoundSocket = xsk.BoundSocket
BUSY_RETRY_SECONDS = xsk.BUSY_RETRY_SECONDS
FaultHook = Callable[[str], None]


def _no_fault(name: str) -> None:
    """No fault injected."""


class Program(Protocol):
    """An XSK program attached to an interface, with the broker's fd of its xsks_map."""

    ifindex: int
    prog_id: int
    map_fd: int
    mode: str
    max_entries: int
    attached_now: bool
    per_queue: bool  # the broker's per-queue program: outer_fd is its array of per-queue maps
    outer_fd: int

    def close(self) -> None: ...


class Prepared(Protocol):
    """A socket with its map slot claimed; add_umem, then try_bind until it binds, then finish (or abort)."""

    queue: int

    def add_umem(self, g: Geometry, memfd: Callable[[int], int] | None = None,
                 apart: Callable[[int | None], None] | None = None) -> None: ...

    def try_bind(self) -> bool: ...

    def finish(self) -> xsk.BoundSocket: ...

    def abort(self, empty_slot: bool = True, close: Callable[[list[int]], None] | None = None) -> None: ...


class Ready(Protocol):
    """A socket made ahead of any request (UMEM registered, rings sized; unbound, in no map)."""

    def close(self) -> None: ...


class SlotProbe(Protocol):
    def queue_of(self, slot: int) -> int | None: ...

    def close(self) -> None: ...


class Kernel(Protocol):
    # ---- interfaces
    def resolve(self, name: str) -> int:
        """The ifindex of the interface whose own name is `name` (NotCanonical, NoSuchInterface)."""
        ...

    def ifname(self, ifindex: int) -> str: ...

    def queue_count(self, name: str) -> int: ...

    # ---- XDP programs and their map
    def attached(self, ifindex: int) -> int:
        """Id of the XDP program on the interface, 0 for none (ForeignProgram when it cannot be told)."""
        ...

    def find_or_attach(self, ifindex: int, ifname: str, queues: int, mode: str) -> Program: ...

    def detach(self, ifindex: int, map_id: int) -> int: ...

    # ---- the per-queue program (map grants)
    def attach_queues(self, ifindex: int, ifname: str, queues: int, mode: str, replace: bool) -> Program:
        """Attach the per-queue program; replace: take the place of libxdp's idle program."""
        ...

    def queue_program(self, ifindex: int) -> Program | None:
        """A handle on the per-queue program this broker attached to the interface, None if none."""
        ...

    def forget_queues(self, ifindex: int) -> None: ...

    def tenant_map(self, entries: int) -> int: ...

    def place(self, outer_fd: int, queues: Iterable[int], map_fd: int) -> None:
        """outer[q] = map_fd for each of queues, all at once (one RCU grace period, not one per queue)."""
        ...

    def inner_id(self, outer_fd: int, queue: int) -> int | None: ...

    def map_fd(self, map_id: int) -> int: ...

    def pin(self, root: str, uid: int, gid: int, ifname: str, map_fd: int) -> str: ...

    def unpin(self, root: str, uid: int, ifname: str) -> bool: ...

    def map_id(self, map_fd: int) -> int: ...

    def map_delete(self, map_fd: int, key: int) -> bool: ...

    def occupied_slots(self, map_fd: int, slots: int | Iterable[int]) -> list[int]: ...

    def dup(self, fd: int) -> int: ...

    def close(self, fd: int) -> None: ...

    # ---- AF_XDP sockets
    def claim(self, ifindex: int, queue: int, map_fd: int, bind_mode: str, need_wakeup: bool) -> Prepared: ...

    def make_ready(self, g: Geometry) -> Ready:
        """A socket of geometry g made ahead of time (the UMEM pool's): nothing in it depends on a request."""
        ...

    def claim_ready(self, ready: Ready, ifindex: int, queue: int, map_fd: int, bind_mode: str,
                    need_wakeup: bool) -> Prepared:
        """The Prepared socket of a grant from a Ready one: its slot claimed. QueueBusy leaves the Ready one as it
        was (the caller's still); any other failure closes it."""
        ...

    def stop(self) -> None:
        """End what make_ready started (the helper process that makes them)."""
        ...

    def create_bare(self, ifname: str, queue: int, map_fd: int) -> int: ...

    def bare_supported(self) -> str | None:
        """None when bare grants work here, else why not."""
        ...

    def bound_queues(self, ifindex: int) -> set[int]: ...

    def slot_probe(self, map_fd: int) -> SlotProbe: ...

    # ---- processes
    def holder(self, pid: int) -> tuple[int, int, int | None] | None:
        """(uid, start time, pidfs inode) of a running process, read while a pidfd pins it; None if gone.
        OSError when no pidfd can be had (out of fds): the broker cannot tell."""
        ...

    def holder_alive(self, pid: int, start: int | None, ino: int | None) -> bool:
        """Whether pid is still the process recorded as (start, ino). OSError when the broker cannot tell (out of
        fds): a caller never takes that for "gone"."""
        ...

    def memlock(self, pid: int) -> tuple[int, int]:
        """(soft, hard) RLIMIT_MEMLOCK of a process, RLIM_INFINITY for unlimited (OSError if unreadable)."""
        ...

    def set_memlock(self, pid: int, limits: tuple[int, int]) -> None: ...


class LinuxKernel:
    """The real kernel, through the kernel-layer modules. `fault` is called at the crash tests' points."""

    def __init__(self, fault: FaultHook = _no_fault) -> None:
        self.fault = fault
        self._preparer: Any = None  # broker.preparer.Preparer, once the UMEM pool asks for a socket
        # stop() may come while the pool's filler starts the helper: none is started after it
        self._preparer_lock = threading.Lock()
        self._stopped = False
        # every release looks at its slots: one probe socket kept, not an AF_XDP socket made and closed per look
        self._probe: socket.socket | None = None

    def resolve(self, name: str) -> int:
        return netdev.resolve(name)

    def ifname(self, ifindex: int) -> str:
        return netdev.ifname(ifindex)

    def queue_count(self, name: str) -> int:
        self.fault("queue-count")  # SIOCETHTOOL waits for rtnl
        return netdev.queue_count(name)

    def attached(self, ifindex: int) -> int:
        return xdp_prog.attached(ifindex)[0]

    def find_or_attach(self, ifindex: int, ifname: str, queues: int, mode: str) -> Program:
        prog_id = xdp_prog.attached(ifindex)[0]
        if prog_id and queue_prog.ours(ifindex, prog_id):
            return queue_prog.handle(ifindex)
        return xdp_prog.find_or_attach(ifindex, ifname, queues, mode)

    def attach_queues(self, ifindex: int, ifname: str, queues: int, mode: str, replace: bool) -> Program:
        if replace:
            return queue_prog.migrate(ifindex, ifname, queues, mode)
        return queue_prog.attach(ifindex, ifname, queues, mode)

    def queue_program(self, ifindex: int) -> Program | None:
        try:
            prog_id = xdp_prog.attached(ifindex)[0]
        except OSError:
            prog_id = 0
        if not prog_id or not queue_prog.ours(ifindex, prog_id):
            return None
        return queue_prog.handle(ifindex)

    def forget_queues(self, ifindex: int) -> None:
        queue_prog.forget(ifindex)

    def tenant_map(self, entries: int) -> int:
        return queue_prog.tenant_map(entries)

    def place(self, outer_fd: int, queues: Iterable[int], map_fd: int) -> None:
        queue_prog.place(outer_fd, queues, map_fd)

    def inner_id(self, outer_fd: int, queue: int) -> int | None:
        return queue_prog.inner_id(outer_fd, queue)

    def map_fd(self, map_id: int) -> int:
        return bpf.map_fd_by_id(map_id)

    def pin(self, root: str, uid: int, gid: int, ifname: str, map_fd: int) -> str:
        return pins.pin(root, uid, gid, ifname, map_fd)

    def unpin(self, root: str, uid: int, ifname: str) -> bool:
        return pins.unpin(root, uid, ifname)

    def detach(self, ifindex: int, map_id: int) -> int:
        return xdp_prog.detach(ifindex, map_id)

    def map_id(self, map_fd: int) -> int:
        return int(bpf.map_info(map_fd).id)

    def map_delete(self, map_fd: int, key: int) -> bool:
        return bpf.map_delete(map_fd, key)

    def occupied_slots(self, map_fd: int, slots: int | Iterable[int]) -> list[int]:
        if self._probe is None:
            self._probe = xsk.probe_socket()
        return xsk.occupied_slots(map_fd, slots, self._probe)

    def dup(self, fd: int) -> int:
        return os.dup(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def claim(self, ifindex: int, queue: int, map_fd: int, bind_mode: str, need_wakeup: bool) -> Prepared:
        return xsk.claim(ifindex, queue, map_fd, bind_mode, need_wakeup, fault=self.fault)

    def make_ready(self, g: Geometry) -> Ready:
        with self._preparer_lock:
            if self._stopped:
                raise OSError(errno.ECANCELED, "the broker is stopping")
            if self._preparer is None:
                from xskbroker.broker.preparer import Preparer  # on first use: nothing of it before the first grant

                self._preparer = Preparer()
            preparer = self._preparer
        made: xsk.Unbound = preparer.make(g)
        return made

    def stop(self) -> None:
        with self._preparer_lock:
            self._stopped = True
            preparer = self._preparer
        if preparer is not None:
            preparer.stop()

    def claim_ready(self, ready: Ready, ifindex: int, queue: int, map_fd: int, bind_mode: str,
                    need_wakeup: bool) -> Prepared:
        assert isinstance(ready, xsk.Unbound)
        return xsk.claim_unbound(ready, ifindex, queue, map_fd, bind_mode, need_wakeup, fault=self.fault)

    def create_bare(self, ifname: str, queue: int, map_fd: int) -> int:
        return xsk.create_bare(ifname, queue, map_fd)

    def bare_supported(self) -> str | None:
        if xsk.kernel_enforces_bindtodevice():
            return None
        return (f"bare grants need Linux 6.5 or later, where SO_BINDTODEVICE confines an AF_XDP bind to the "
                f"device; this is {os.uname().release}")

    def bound_queues(self, ifindex: int) -> set[int]:
        self.fault("queue-look")  # the dump waits for rtnl (veth and every device without its own ops lock)
        return xskdiag.xsk_queues(ifindex)

    def slot_probe(self, map_fd: int) -> SlotProbe:
        return xskdiag.SlotProbe(map_fd)

    def holder(self, pid: int) -> tuple[int, int, int | None] | None:
        pidfd = pidfd_open(pid)
        if pidfd is None:
            return None
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = status_ids(f.read())[0]  # the real uid: "same user" means the real one
            start = pinned_start(pidfd, pid)  # after the uid: still running then, so both reads were its own
            ino = pidfd_ino(pidfd)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise  # out of fds: the broker cannot tell, which is not "gone" (the docstring's promise)
            return None
        except ValueError:
            return None
        finally:
            os.close(pidfd)
        return None if start is None else (uid, start, ino)

    def holder_alive(self, pid: int, start: int | None, ino: int | None) -> bool:
        pidfd = pidfd_open(pid)
        if pidfd is None:
            return False
        try:
            return is_process(pidfd, pid, start, ino)
        finally:
            os.close(pidfd)

    def memlock(self, pid: int) -> tuple[int, int]:
        with open(f"/proc/{pid}/limits") as f:
            limits = memlock_limits(f.read())
        if limits is None:
            raise OSError(errno.ENOENT, f"no memlock limit in /proc/{pid}/limits")
        soft, hard = (resource.RLIM_INFINITY if v is None else v for v in limits)
        return soft, hard

    def set_memlock(self, pid: int, limits: tuple[int, int]) -> None:
        resource.prlimit(pid, resource.RLIMIT_MEMLOCK, limits)
