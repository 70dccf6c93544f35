"""The v1 wire protocol (wire/protocol.py): every validation error of a grant's own fields and its code
(interface, queues, kind, bind_mode, need_wakeup, umem, rings), and which unknown field an error names when
a message has many: the first, in the message's own order.
"""

from __future__ import annotations

from typing import Any

import pytest

from xskbroker.wire.protocol import MAX_QUEUES, MAX_RING, MAX_UMEM

from .protocol_helpers import DROP, bad_grant, good_grant, raw, refused

# ---- grant: interface ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["eth0", "a", "x" * 15, "vlan.100", "br-lan_2", "é" * 7, "ethé"])
def test_valid_interface_names(name: str) -> None:
    assert good_grant(interface=name).interface == name


@pytest.mark.parametrize("name", ["", "x" * 16, "é" * 8, "a/b", "/", " eth0", "eth0 ", "eth0\n", "\teth0",
                                  "eth0\u00a0", "eth0\x00", "\x00", "\ud800", "eth\udfff0",
                                  # the old alias syntax: ioctls cut at ':' and act on eth0 (finding 2)
                                  "eth0:1", "eth0:", ":", "eth 0", "eth\u20000", ".", ".."])
def test_invalid_interface_names(name: str) -> None:
    assert "interface name" in bad_grant(interface=name).message


@pytest.mark.parametrize("name", ["eth0:x", "a b", ".."])
def test_a_revoke_by_an_impossible_interface_name_is_refused(name: str) -> None:
    err = refused(raw(op="revoke", interface=name))
    assert err.code == "bad-request" and "not a valid interface name" in err.message


def test_a_lone_surrogate_in_the_json_text_is_refused() -> None:
    err = refused(b'{"v":1,"op":"grant","id":42,"interface":"\\ud800","queues":[0]}')
    assert (err.code, err.op, err.req_id) == ("bad-request", "grant", 42)


@pytest.mark.parametrize("name", [DROP, None, 5, True, ["eth0"], {"name": "eth0"}])
def test_interface_must_be_a_string(name: Any) -> None:
    assert "'interface'" in bad_grant(interface=name).message


# ---- grant: queues ------------------------------------------------------------------------------------

def test_queue_list_bounds() -> None:
    assert good_grant(queues=[0, 65535]).queues == (0, 65535)
    assert len(good_grant(queues=list(range(MAX_QUEUES))).queues) == MAX_QUEUES
    assert str(MAX_QUEUES) in bad_grant(queues=list(range(MAX_QUEUES + 1))).message


@pytest.mark.parametrize("queues", [[], [-1], [65536], [0, 2**64], [True], [False], [0, True], [1.0], ["0"],
                                    [None], [[0]], [{"q": 0}]])
def test_bad_queue_lists(queues: list[Any]) -> None:
    message = bad_grant(queues=queues).message
    assert message.startswith(("queues must be", "queue ids must be")), message


@pytest.mark.parametrize("queues", [[1, 1], [0, 1, 2, 1], [7] * 3])
def test_duplicate_queues(queues: list[int]) -> None:
    assert "distinct" in bad_grant(queues=queues).message


@pytest.mark.parametrize("queues", [DROP, None, "all", "0", {"0": 1}, True, False, 1.0, 2.5])
def test_queues_must_be_a_list_or_a_count(queues: Any) -> None:
    assert "queues" in bad_grant(queues=queues).message


@pytest.mark.parametrize("count", [0, -1, MAX_QUEUES + 1, 2**40])
def test_queue_count_bounds(count: int) -> None:
    assert "queues must be between 1 and" in bad_grant(queues=count).message


@pytest.mark.parametrize(("count", "start"), [(1, -1), (1, 65536), (2, 65535), (MAX_QUEUES, 65536 - MAX_QUEUES + 1),
                                              (1, 2**40)])
def test_start_queue_bounds(count: int, start: int) -> None:
    assert "start_queue" in bad_grant(queues=count, start_queue=start).message


@pytest.mark.parametrize("start", [True, False, "1", 1.0, None, [1]])
def test_start_queue_must_be_an_integer(start: Any) -> None:
    assert "'start_queue'" in bad_grant(queues=1, start_queue=start).message


# ---- grant: kind, bind_mode, need_wakeup ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bound", "bare", "map"])
def test_kinds(kind: str) -> None:
    assert good_grant(kind=kind, queues=DROP if kind == "map" else [0]).kind == kind


@pytest.mark.parametrize("kind", ["Bound", "", "shared", 1, None, True])
def test_bad_kind(kind: Any) -> None:
    message = bad_grant(kind=kind).message
    assert message.startswith(("kind must be one of", "field 'kind' must be")), message


@pytest.mark.parametrize("mode", ["auto", "copy", "zerocopy"])
def test_bind_modes(mode: str) -> None:
    assert good_grant(bind_mode=mode).bind_mode == mode


@pytest.mark.parametrize("mode", ["zero-copy", "native", "", None, 0])
def test_bad_bind_mode(mode: Any) -> None:
    message = bad_grant(bind_mode=mode).message
    assert message.startswith(("bind_mode must be one of", "field 'bind_mode' must be")), message


@pytest.mark.parametrize("value", [True, False])
def test_need_wakeup(value: bool) -> None:
    assert good_grant(need_wakeup=value).need_wakeup is value


@pytest.mark.parametrize("value", [1, 0, "true", None, [True]])
def test_need_wakeup_must_be_a_boolean(value: Any) -> None:
    assert "'need_wakeup'" in bad_grant(need_wakeup=value).message


# ---- grant: umem ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("umem", [[], 1, "4MiB", None, True])
def test_umem_must_be_an_object(umem: Any) -> None:
    assert "'umem'" in bad_grant(umem=umem).message


@pytest.mark.parametrize("frame", [2048, 4096])
def test_frame_sizes(frame: int) -> None:
    assert good_grant(umem={"frame_size": frame}).geometry.frame_size == frame


@pytest.mark.parametrize("frame", [0, 1024, 3072, 8192, 4096.0, "4096", True, None])
def test_bad_frame_size(frame: Any) -> None:
    assert "frame_size" in bad_grant(umem={"frame_size": frame}).message


@pytest.mark.parametrize(("size", "frame"), [(4096, 4096), (4096, 2048), (8192, 4096), (MAX_UMEM, 4096),
                                             (MAX_UMEM - 4096, 2048)])
def test_umem_sizes(size: int, frame: int) -> None:
    assert good_grant(umem={"size": size, "frame_size": frame}).geometry.umem_size == size


@pytest.mark.parametrize(("size", "frame"), [(0, 4096), (-4096, 4096), (2048, 4096), (2048, 2048), (4097, 4096),
                                             (6144, 2048), (MAX_UMEM + 4096, 4096), (2**80, 4096)])
def test_bad_umem_size(size: int, frame: int) -> None:
    assert "umem.size" in bad_grant(umem={"size": size, "frame_size": frame}).message


@pytest.mark.parametrize("size", [True, 4096.0, "4096", None])
def test_umem_size_must_be_an_integer(size: Any) -> None:
    assert "'size'" in bad_grant(umem={"size": size}).message


@pytest.mark.parametrize(("headroom", "frame"), [(0, 4096), (256, 4096), (3840, 4096), (1792, 2048)])
def test_headroom(headroom: int, frame: int) -> None:
    assert good_grant(umem={"headroom": headroom, "frame_size": frame}).geometry.headroom == headroom


@pytest.mark.parametrize(("headroom", "frame"), [(-1, 4096), (3841, 4096), (4096, 4096), (1793, 2048)])
def test_bad_headroom(headroom: int, frame: int) -> None:
    assert "umem.headroom" in bad_grant(umem={"headroom": headroom, "frame_size": frame}).message


@pytest.mark.parametrize("headroom", [False, 0.0, "0", None])
def test_headroom_must_be_an_integer(headroom: Any) -> None:
    assert "'headroom'" in bad_grant(umem={"headroom": headroom}).message


def test_unknown_umem_field() -> None:
    assert "umem.flags" in bad_grant(umem={"size": 8192, "flags": 0}).message


# ---- grant: rings ---------------------------------------------------------------------------------------

RINGS = ("fill", "completion", "rx", "tx")


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("size", [1, 2, 64, 2048, MAX_RING])
def test_ring_sizes(ring: str, size: int) -> None:
    assert getattr(good_grant(rings={ring: size}).geometry, ring) == size


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("size", [0, -2, 3, 1000, 2049, MAX_RING + 1, 2 * MAX_RING, 2**40])
def test_ring_size_must_be_a_power_of_two_up_to_the_limit(ring: str, size: int) -> None:
    assert f"rings.{ring}" in bad_grant(rings={ring: size}).message


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("size", [True, 2048.0, "2048", None])
def test_ring_size_must_be_an_integer(ring: str, size: Any) -> None:
    assert repr(ring) in bad_grant(rings={ring: size}).message


@pytest.mark.parametrize("rings", [[], 2048, "2048", None])
def test_rings_must_be_an_object(rings: Any) -> None:
    assert "'rings'" in bad_grant(rings=rings).message


def test_unknown_ring() -> None:
    assert "rings.cq" in bad_grant(rings={"cq": 2048}).message


# ---- unknown fields: the error names the first one, in the message's own order ----------------------------

# Many unknown keys, so that an order chosen by string hashing (a set's, which varies per process) would
# name the first one only by chance; "zz" sorts after every known key and "a" before, so sorting is not
# what makes the answer either.
UNKNOWN = [f"zz{i}" for i in range(40, 0, -1)] + [f"a{i}" for i in range(40)]


def test_an_unknown_field_error_names_the_first_unknown_field() -> None:
    err = refused(raw(op="status", **dict.fromkeys(UNKNOWN, 0)))
    assert err.message == "unknown field 'zz40' in status request"
    err = refused(raw(op="grant", interface="eth0", queues=[0], **dict.fromkeys(UNKNOWN, 0)))
    assert err.message == "unknown field 'zz40' in grant request"


@pytest.mark.parametrize("where", ["umem", "rings"])
def test_an_unknown_umem_or_ring_key_error_names_the_first_one(where: str) -> None:
    assert bad_grant(**{where: dict.fromkeys(UNKNOWN, 1)}).message == f"unknown field '{where}.zz40'"
