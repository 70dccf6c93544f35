"""Parsing what the kernel says about AF_XDP sockets and queues (broker.xskdiag), on captured bytes."""

from __future__ import annotations

import errno
import struct

import pytest

from xskbroker.broker import squat, xskdiag
from xskbroker.broker.lease_record import Lease

# netdev family queue-get dump for ifindex 3 (a 2-queue veth), captured on Linux 6.18 while a bare socket
# granted queue 0 was bound to queue 1: RX 0, RX 1 (with the empty NETDEV_A_QUEUE_XSK nest), TX 0, TX 1
QUEUE_DUMP = [
    b"\n\x01\x00\x00\x08\x00\x01\x00\x00\x00\x00\x00\x08\x00\x03\x00\x00\x00\x00\x00\x08\x00\x02\x00\x03\x00\x00\x00",
    b"\n\x01\x00\x00\x08\x00\x01\x00\x01\x00\x00\x00\x08\x00\x03\x00\x00\x00\x00\x00\x08\x00\x02\x00\x03\x00\x00\x00"
    b"\x04\x00\x07\x80",
    b"\n\x01\x00\x00\x08\x00\x01\x00\x00\x00\x00\x00\x08\x00\x03\x00\x01\x00\x00\x00\x08\x00\x02\x00\x03\x00\x00\x00",
    b"\n\x01\x00\x00\x08\x00\x01\x00\x01\x00\x00\x00\x08\x00\x03\x00\x01\x00\x00\x00\x08\x00\x02\x00\x03\x00\x00\x00"
    b"\x04\x00\x07\x80",
]
# the answer of a kernel without CONFIG_XDP_SOCKETS_DIAG to an AF_XDP sock_diag dump (captured, port id zeroed):
# NLMSG_ERROR -ENOENT echoing the request
SOCK_DIAG_ENOENT = (
    b"8\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\xfe\xff\xff\xff$\x00\x00\x00\x14\x00\x01\x03"
    b"\x01\x00\x00\x00\x00\x00\x00\x00,\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")


def test_queue_dump_names_the_rx_queue_with_an_xsk_pool() -> None:
    assert xskdiag.parse_queues(QUEUE_DUMP, 3) == ({1}, True)
    assert xskdiag.parse_queues(QUEUE_DUMP, 4) == (set(), False)  # another device's queues are not counted
    assert xskdiag.parse_queues([QUEUE_DUMP[0], QUEUE_DUMP[2]], 3) == (set(), True)


def test_queue_dump_tolerates_truncated_attributes() -> None:
    assert xskdiag.parse_queues([QUEUE_DUMP[1][:-6], b"", b"\n\x01"], 3) == (set(), False)


def test_sock_diag_error_raises_its_errno() -> None:
    with pytest.raises(OSError) as e:
        list(xskdiag.messages(SOCK_DIAG_ENOENT))
    assert e.value.errno == errno.ENOENT


def _diag_msg(inode: int, info: tuple[int, int] | None, uid: int | None) -> bytes:
    # struct xdp_diag_msg + XDP_DIAG_INFO + XDP_DIAG_UID, as include/uapi/linux/xdp_diag.h lays them out
    # (built, not captured: this kernel has no xsk_diag)
    body = struct.pack("=BBHI8s", xskdiag.AF_XDP, 3, 0, inode, b"\1" * 8)
    if info is not None:
        body += xskdiag._nla(xskdiag.XDP_DIAG_INFO, struct.pack("=II", *info))
    if uid is not None:
        body += xskdiag._nla(xskdiag.XDP_DIAG_UID, struct.pack("=I", uid))
    return body


def test_sock_diag_message_gives_inode_queue_and_uid() -> None:
    bound = xskdiag.parse_sock_diag(_diag_msg(4711, (3, 1), 65534))
    assert bound == xskdiag.XskSocket(4711, 3, 1, 65534) and bound.bound
    unbound = xskdiag.parse_sock_diag(_diag_msg(4712, None, 0))
    assert unbound == xskdiag.XskSocket(4712, 0, 0, 0) and not unbound.bound
    assert xskdiag.parse_sock_diag(b"\x02" + _diag_msg(1, (3, 1), 0)[1:]) is None  # not AF_XDP
    assert xskdiag.parse_sock_diag(b"\x2c\x03") is None


def test_netlink_framing_splits_a_multipart_datagram() -> None:
    part = struct.pack("=IHHII", 16 + len(QUEUE_DUMP[1]), 30, 2, 1, 0) + QUEUE_DUMP[1]
    done = struct.pack("=IHHII", 20, xskdiag.NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    assert list(xskdiag.messages(part + done)) == [(30, QUEUE_DUMP[1]), (xskdiag.NLMSG_DONE, b"\0" * 4)]


def test_slot_probe_program_embeds_the_map_fd() -> None:
    insns = xskdiag._probe_insns(42)
    assert len(insns) == 18 * 8
    code, regs, _, imm = struct.unpack_from("<BBhi", insns, 7 * 8)
    assert (code, regs, imm) == (0x18, 0x11, 42)  # ld_imm64 r1, BPF_PSEUDO_MAP_FD
    assert struct.unpack_from("<BBhi", insns, 4 * 8)[2] == 11  # the bounds check jumps to "return XDP_PASS"


def test_squatter_message_names_lease_uid_pid_and_granted_queue() -> None:
    lease = Lease("abcd", 65534, 77, 3, "xsk0", (0,), "bare", 0)
    assert squat.squatter_message("xsk0", 1, lease) == (
        "queue 1 of xsk0 is bound by the bare socket of lease abcd (uid 65534, pid 77), granted queue 0")
    assert "the broker did not make" in squat.squatter_message("xsk0", 1, None)


# the end of a netdev queue-get dump for an ifindex that no longer exists (captured on Linux 6.18, port id
# zeroed): NLMSG_DONE (NLM_F_MULTI) whose payload is -ENODEV, the dump's error
QUEUE_DUMP_ENODEV = b"\x14\x00\x00\x00\x03\x00\x02\x00\x01\x00\x00\x00\x00\x00\x00\x00\xed\xff\xff\xff"


def test_a_dump_that_ends_with_an_error_raises_it() -> None:
    with pytest.raises(OSError) as e:
        list(xskdiag.messages(QUEUE_DUMP_ENODEV))
    assert e.value.errno == errno.ENODEV


def test_a_dump_that_ends_well_still_ends() -> None:
    done = QUEUE_DUMP_ENODEV[:16] + b"\0" * 4
    assert list(xskdiag.messages(done)) == [(xskdiag.NLMSG_DONE, b"\0" * 4)]
