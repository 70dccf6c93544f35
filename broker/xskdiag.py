"""Where AF_XDP sockets are bound, as the kernel tells it: the broker's view of queue squatting.

A bare grant's socket is bound by its holder, to any queue of the device: the kernel has no per-queue
lock. Three kernel sources say who is bound where, the first precise, the others what this kernel has:
- NETLINK_SOCK_DIAG with family AF_XDP (xsk_diag): inode, ifindex, queue, uid of every socket. Built
  only with CONFIG_XDP_SOCKETS_DIAG; without it the dump answers ENOENT (Unsupported).
- the `netdev` generic-netlink family's queue objects: an RX queue with an AF_XDP pool attached
  carries NETDEV_A_QUEUE_XSK (Linux 6.11+). Which queues are bound, not by which socket.
- a tiny XDP program run with BPF_PROG_TEST_RUN that looks up xsks_map[slot] and reads the socket's
  bound queue_id (struct bpf_xdp_sock): which queue the socket in a lease's slot is bound to. An
  unbound socket reads 0, so a socket bound to queue 0 from another slot looks unbound here.
Raw netlink and bpf(2) through libbpf, no new dependency.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

from xskbroker.broker import bpf
from xskbroker.broker.netlink import NLA, NLMSG_DONE, NLMSGHDR, attrs, messages
from xskbroker.common.records import record

NETLINK_SOCK_DIAG = 4
NETLINK_GENERIC = 16
SOCK_DIAG_BY_FAMILY = 20
AF_XDP = 44
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
XDP_SHOW_INFO = 1
XDP_DIAG_INFO, XDP_DIAG_UID = 1, 2
GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 16, 3, 1, 2
NETDEV_CMD_QUEUE_GET = 10
NETDEV_A_QUEUE_ID, NETDEV_A_QUEUE_IFINDEX, NETDEV_A_QUEUE_TYPE, NETDEV_A_QUEUE_XSK = 1, 2, 3, 7
NETDEV_QUEUE_TYPE_RX = 0
NO_SOCKET = 0xFFFFFFFF  # the probe's answer for an empty slot

_XDP_DIAG_REQ = struct.Struct("=BBHII8s")
_XDP_DIAG_MSG = struct.Struct("=BBHI8s")


class Unsupported(OSError):
    """The kernel lacks this source (no xsk_diag, no netdev family or no queue XSK attribute)."""


@record(frozen=True)
class XskSocket:
    inode: int
    ifindex: int  # 0 while unbound
    queue: int
    uid: int | None

    @property
    def bound(self) -> bool:
        return self.ifindex != 0


def _dump(proto: int, kind: int, body: bytes, flags: int = NLM_F_REQUEST | NLM_F_DUMP) -> list[bytes]:
    """Send one request and collect the payloads of its answer up to NLMSG_DONE."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, proto) as s:
        s.settimeout(2.0)
        s.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, 1, 0) + body)
        out: list[bytes] = []
        while True:
            data = s.recv(1 << 16)
            for mtype, payload in messages(data):
                if mtype == NLMSG_DONE:
                    return out
                out.append(payload)
            if not flags & NLM_F_DUMP:
                return out


def _nla(kind: int, value: bytes) -> bytes:
    return NLA.pack(NLA.size + len(value), kind) + value + b"\0" * (-len(value) % 4)


# ---- sock_diag (xsk_diag) -------------------------------------------------------------------------

def parse_sock_diag(payload: bytes) -> XskSocket | None:
    """One SOCK_DIAG_BY_FAMILY answer for AF_XDP (struct xdp_diag_msg + attributes)."""
    if len(payload) < _XDP_DIAG_MSG.size:
        return None
    family, _, _, inode, _ = _XDP_DIAG_MSG.unpack_from(payload)
    if family != AF_XDP:
        return None
    a = attrs(payload, _XDP_DIAG_MSG.size)
    ifindex, queue = struct.unpack_from("=II", a[XDP_DIAG_INFO]) if len(a.get(XDP_DIAG_INFO, b"")) >= 8 else (0, 0)
    uid = struct.unpack_from("=I", a[XDP_DIAG_UID])[0] if len(a.get(XDP_DIAG_UID, b"")) >= 4 else None
    return XskSocket(inode, ifindex, queue, uid)


def sock_diag() -> list[XskSocket]:
    """Every AF_XDP socket of this network namespace; Unsupported without CONFIG_XDP_SOCKETS_DIAG."""
    req = _XDP_DIAG_REQ.pack(AF_XDP, 0, 0, 0, XDP_SHOW_INFO, b"\0" * 8)
    try:
        payloads = _dump(NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, req)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise Unsupported(e.errno, "this kernel has no AF_XDP sock_diag (CONFIG_XDP_SOCKETS_DIAG)") from None
        raise
    return [x for x in map(parse_sock_diag, payloads) if x is not None]


# ---- netdev family: queues with an XSK pool ----------------------------------------------------------

_family: dict[str, int] = {}


def genl_family(name: str) -> int:
    if name not in _family:
        body = struct.pack("=BBH", CTRL_CMD_GETFAMILY, 1, 0) + _nla(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")
        try:
            payloads = _dump(NETLINK_GENERIC, GENL_ID_CTRL, body, NLM_F_REQUEST)
        except OSError as e:
            raise Unsupported(e.errno, f"no generic netlink family {name!r}") from None
        found = attrs(payloads[0], 4).get(CTRL_ATTR_FAMILY_ID) if payloads else None
        if not found:
            raise Unsupported(errno.ENOENT, f"no generic netlink family {name!r}")
        _family[name] = struct.unpack_from("=H", found)[0]
    return _family[name]


def parse_queues(payloads: list[bytes], ifindex: int) -> tuple[set[int], bool]:
    """(RX queues of ifindex with an XSK pool, whether any queue object was seen) from queue-get answers."""
    bound: set[int] = set()
    seen = False
    for payload in payloads:
        a = attrs(payload, 4)  # after struct genlmsghdr
        owner = struct.unpack_from("=I", a.get(NETDEV_A_QUEUE_IFINDEX, b"\0" * 4))[0]
        if NETDEV_A_QUEUE_ID not in a or owner != ifindex:
            continue
        seen = True
        if struct.unpack_from("=I", a.get(NETDEV_A_QUEUE_TYPE, b"\0" * 4))[0] == NETDEV_QUEUE_TYPE_RX \
                and NETDEV_A_QUEUE_XSK in a:
            bound.add(struct.unpack_from("=I", a[NETDEV_A_QUEUE_ID])[0])
    return bound, seen


def xsk_queues(ifindex: int) -> set[int]:
    """RX queues of the device that an AF_XDP socket is bound to (whoever made it)."""
    body = struct.pack("=BBH", NETDEV_CMD_QUEUE_GET, 1, 0) + _nla(NETDEV_A_QUEUE_IFINDEX, struct.pack("=I", ifindex))
    bound, _ = parse_queues(_dump(NETLINK_GENERIC, genl_family("netdev"), body), ifindex)
    return bound


# ---- xsks_map slot probe: which queue the socket in a slot is bound to ---------------------------------

def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _probe_insns(map_fd: int) -> bytes:
    """XDP program: key = u32 at data[0]; data[4..8] = xsks_map[key]->queue_id, or NO_SOCKET when empty."""
    return b"".join([
        _insn(0x61, 6, 1, 0),            # r6 = ctx->data
        _insn(0x61, 2, 1, 4),            # r2 = ctx->data_end
        _insn(0xBF, 3, 6),               # r3 = r6
        _insn(0x07, 3, imm=8),           # r3 += 8
        _insn(0x2D, 3, 2, 11),           # if r3 > r2 goto exit
        _insn(0x61, 1, 6, 0),            # r1 = key
        _insn(0x63, 10, 1, -4),          # *(u32 *)(fp - 4) = r1
        _insn(0x18, 1, 1, 0, map_fd),    # r1 = map (BPF_PSEUDO_MAP_FD)
        _insn(0x00),
        _insn(0xBF, 2, 10),              # r2 = fp
        _insn(0x07, 2, imm=-4),          # r2 -= 4
        _insn(0x85, imm=1),              # r0 = bpf_map_lookup_elem(map, &key)
        _insn(0xB4, 1, imm=-1),          # w1 = NO_SOCKET
        _insn(0x15, 0, 0, 1),            # if r0 == NULL skip the read
        _insn(0x61, 1, 0, 0),            # r1 = ((struct bpf_xdp_sock *)r0)->queue_id
        _insn(0x63, 6, 1, 4),            # data[4..8] = r1
        _insn(0xB7, 0, imm=2),           # return XDP_PASS
        _insn(0x95),
    ])


class _TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
                ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


class SlotProbe:
    """Reads the bound queue of the socket in each xsks_map slot (one BPF_PROG_TEST_RUN per slot)."""

    def __init__(self, map_fd: int) -> None:
        lib = bpf.libbpf()
        lib.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                      ctypes.c_size_t, ctypes.c_void_p]
        lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.c_void_p]
        insns = _probe_insns(map_fd)
        self.fd = bpf.check(lib.bpf_prog_load(6, b"xskb_slot_probe", b"GPL", insns, len(insns) // 8, None),
                            "load the xsks_map slot probe")  # 6: BPF_PROG_TYPE_XDP
        self._in = ctypes.create_string_buffer(64)
        self._out = ctypes.create_string_buffer(64)

    def queue_of(self, slot: int) -> int | None:
        """The queue the socket in the slot is bound to (0 also when unbound); None when the slot is empty."""
        struct.pack_into("=I", self._in, 0, slot)
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(self._in),
                            data_out=ctypes.addressof(self._out), data_size_in=64, data_size_out=64, repeat=1)
        bpf.check(bpf.libbpf().bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)), f"probe slot {slot}")
        queue: int = struct.unpack_from("=I", self._out, 4)[0]
        return None if queue == NO_SOCKET else queue

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
