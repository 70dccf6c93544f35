"""The broker's own per-queue XSK program, for interfaces where some queues are map grants.

    queue = ctx->rx_queue_index
    inner = outer[queue]              (BPF_MAP_TYPE_ARRAY_OF_MAPS, one slot per queue)
    return inner ? bpf_redirect_map(inner, queue, XDP_PASS) : XDP_PASS

outer[q] holds either the broker's shared XSKMAP (the one bound and bare grants put their sockets in, as
in libxdp's program) or a map-grant tenant's own XSKMAP. A tenant's map fd therefore steers only the queues
whose outer slot points at its map; writing any other slot of its map changes nothing, and putting the
shared map back at outer[q] is a revoke that no copy of the tenant's fd survives.

The program is attached through a bpf_link, held here for as long as the broker runs: a process that
detaches XDP through netlink (a root DPDK exiting) gets EBUSY instead of tearing the broker's program down.
The link is not pinned, so the program goes with the broker (fail closed: no tenant map outlives the
broker that could take it back).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable

from xskbroker.broker import bpf, bpfsys, xdp_prog
from xskbroker.common.records import field, record

PROG_NAME = "xskb_queues"
OUTER_NAME = "xskb_outer"
SHARED_NAME = "xskb_shared"
TENANT_NAME = "xskb_tenant"
XDP_PASS = 2
_MODE_FLAGS = {"native": bpf.XDP_FLAGS_DRV_MODE, "skb": bpf.XDP_FLAGS_SKB_MODE}


def _program(outer_fd: int) -> bytes:
    i = bpfsys.insn
    return b"".join([
        i(0x61, 2, 1, 16),           # r2 = *(u32 *)(r1 + offsetof(struct xdp_md, rx_queue_index))
        i(0x63, 10, 2, -4),          # *(u32 *)(r10 - 4) = r2
        i(0xbf, 6, 2),               # r6 = r2
        i(0x18, 1, 1, 0, outer_fd),  # r1 = outer map (ld_imm64, BPF_PSEUDO_MAP_FD)
        i(0x00),
        i(0xbf, 2, 10),              # r2 = r10
        i(0x07, 2, 0, 0, -4),        # r2 += -4
        i(0x85, 0, 0, 0, 1),         # r0 = bpf_map_lookup_elem(outer, &queue)
        i(0x15, 0, 0, 5, 0),         # if r0 == 0 goto pass
        i(0xbf, 1, 0),               # r1 = r0 (the queue's inner XSKMAP)
        i(0xbf, 2, 6),               # r2 = queue
        i(0xb7, 3, 0, 0, XDP_PASS),  # r3 = XDP_PASS (the slot is empty)
        i(0x85, 0, 0, 0, 51),        # r0 = bpf_redirect_map(inner, queue, XDP_PASS)
        i(0x95),                     # exit
        i(0xb7, 0, 0, 0, XDP_PASS),  # pass: r0 = XDP_PASS
        i(0x95),                     # exit
    ])


@record
class _Attached:
    link_fd: int
    prog_id: int
    outer_fd: int
    shared_fd: int
    mode: str
    entries: int


@record
class QueueProgram:
    """A handle on the attached program (the Program the grants use): map_fd is the shared XSKMAP."""

    ifindex: int
    prog_id: int
    map_fd: int
    mode: str
    max_entries: int
    attached_now: bool
    outer_fd: int = -1
    per_queue: bool = field(default=True)

    def close(self) -> None:
        for name in ("map_fd", "outer_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


_links: dict[int, _Attached] = {}  # ifindex -> the program this broker attached there


def ours(ifindex: int, prog_id: int) -> bool:
    a = _links.get(ifindex)
    return a is not None and a.prog_id == prog_id


def handle(ifindex: int, attached_now: bool = False) -> QueueProgram:
    a = _links[ifindex]
    shared = os.dup(a.shared_fd)
    try:
        outer = os.dup(a.outer_fd)
    except BaseException:
        os.close(shared)  # out of fds at the second dup: the first must not stay open
        raise
    return QueueProgram(ifindex, a.prog_id, shared, a.mode, a.entries, attached_now, outer)


def attach(ifindex: int, ifname: str, entries: int, mode: str) -> QueueProgram:
    """Load and link the per-queue program on an interface with no XDP program. Every outer slot starts
    at the shared map, so bound and bare grants work as under libxdp's program."""
    if ifindex in _links:
        forget(ifindex)  # a stale record (the interface lost its program): the kernel is the truth
    made: list[int] = []
    try:
        shared = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_XSKMAP, entries, SHARED_NAME)
        made.append(shared)
        outer = bpfsys.map_create(bpfsys.BPF_MAP_TYPE_ARRAY_OF_MAPS, entries, OUTER_NAME, inner_map_fd=shared)
        made.append(outer)
        bpfsys.map_update_all(outer, list(range(entries)), shared)  # one grace period, not one per slot
        prog = bpfsys.prog_load_xdp(_program(outer), PROG_NAME)
        made.append(prog)
        tries = ["native", "skb"] if mode == "auto" else [mode]
        errors = []
        link = -1
        for m in tries:
            try:
                link = bpfsys.link_create_xdp(prog, ifindex, _MODE_FLAGS[m])
            except OSError as e:
                errors.append(f"{m}: {e.strerror}")
                if e.errno in (errno.EBUSY, errno.EEXIST):
                    break  # a program is attached: another mode would not help
                continue
            mode = m
            break
        if link < 0:
            raise OSError(errno.EBUSY if any("busy" in x.lower() for x in errors) else errno.EOPNOTSUPP,
                          f"cannot attach the per-queue XSK program to {ifname}: " + "; ".join(errors))
        made.append(link)  # from here a failure must unlink too: closing the link detaches the program
        prog_id = int(bpf.prog_info(prog)[0].id)
    except BaseException:
        for fd in made:
            os.close(fd)
        raise
    os.close(prog)  # the link holds the program
    _links[ifindex] = _Attached(link, prog_id, outer, shared, mode, entries)
    return handle(ifindex, attached_now=True)


def forget(ifindex: int) -> None:
    """Drop the broker's record (and link) of an interface's program: it is gone, or going with the link."""
    a = _links.pop(ifindex, None)
    if a is None:
        return
    for fd in (a.link_fd, a.outer_fd, a.shared_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


def forget_all() -> None:
    for ifindex in list(_links):
        forget(ifindex)


def migrate(ifindex: int, ifname: str, entries: int, mode: str) -> QueueProgram:
    """Replace libxdp's xsk_def_prog (which the caller found idle: no lease, no socket in its map) by the
    per-queue program. Any other program is never touched (ForeignProgram)."""
    prog_id, current = xdp_prog.attached(ifindex)
    if prog_id:
        xdp_prog.adopt(ifindex, ifname, prog_id, current or "?").close()  # ForeignProgram unless it is libxdp's
        if not xdp_prog.detach(ifindex):
            raise xdp_prog.ForeignProgram(errno.EEXIST, f"{ifname}: the XSK program changed while it was replaced")
    return attach(ifindex, ifname, entries, current if mode == "auto" and current in _MODE_FLAGS else mode)


def tenant_map(entries: int) -> int:
    """A tenant's own XSKMAP (the outer map's template size: the kernel insists on it)."""
    return bpfsys.map_create(bpfsys.BPF_MAP_TYPE_XSKMAP, entries, TENANT_NAME)


def place(outer_fd: int, queues: Iterable[int], map_fd: int) -> None:
    """outer[q] = map_fd for each of queues, in one update: the kernel waits for a grace period after each."""
    bpfsys.map_update_all(outer_fd, list(queues), map_fd)


def inner_id(outer_fd: int, queue: int) -> int | None:
    return bpfsys.map_lookup(outer_fd, queue)
