"""How Connection reads replies a broker should not send: a late reply after a timeout, fd indexes the typed
reading must refuse as the dict reading does, fds a reply does not name, and ok/v of the wrong JSON type.
Against tests/fake_broker.py's scripted fake broker: a SEQPACKET listener in a thread answering each request
with the next scripted reply."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from xskbroker.client.connection import Connection
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import BrokerError, ErrorCode

from ..fake_broker import fake_broker, null_fds

__all__ = ["fake_broker"]  # a fixture

G = proto.Geometry(8192, 2048, 256, 64, 128, 256, 512)


def bound(lease: str, fd: int = 0, umem_fd: int = 1) -> bytes:
    return proto.ok_reply("grant", None, lease=lease, kind="bound", interface="xdoc0", ifindex=3,
                          xdp_mode="native", xdp_prog_id=464,
                          sockets=[{"queue": 0, "fd": fd, "umem_fd": umem_fd, "bind_flags": 10, "zerocopy": False,
                                    **G.to_wire()}])


MAP = proto.ok_reply("grant", None, lease="8d234e03127b9bfe", kind="map", interface="xdoc1", ifindex=2,
                     xdp_mode="native", xdp_prog_id=1339, map_fd=-1, map_entries=2)
STATUS = proto.ok_reply("status", None, leases=[], interfaces=[])


def test_a_reply_that_comes_after_the_timeout_is_not_taken_for_the_next_requests(fake_broker: Any) -> None:
    # a program granting over one kept connection retries after a timeout: the late answer to the first grant
    # (its lease, its fds) must not pass for the answer to the second
    path, script = fake_broker
    script += [(bound("1111111111111111"), 2, 0.5), (bound("2222222222222222"), 2, 0)]
    with Connection(path, timeout=0.2) as conn:
        with pytest.raises(TimeoutError):
            conn.call(proto.Grant("xdoc0", (0,), geometry=G))
        time.sleep(0.5)  # the late reply is queued now
        try:
            reply, fds = conn.call(proto.Grant("xdoc0", (0,), geometry=G))
        except (BrokerError, OSError):
            return
        for fd in fds:
            os.close(fd)
        assert reply["lease"] == "2222222222222222", "the first grant's late reply was taken for the second's"


@pytest.mark.parametrize("reply, nfds", [(MAP, 0), (bound("1111111111111111", umem_fd=-1), 1)])
def test_call_typed_refuses_a_negative_fd_index_as_call_does(fake_broker: Any, reply: bytes, nfds: int) -> None:
    # fds[-1] is some other fd of the reply (or an IndexError): the dict reading refuses it as bad-reply
    path, script = fake_broker
    script += [(reply, nfds, 0), (reply, nfds, 0)]
    with Connection(path, timeout=5) as conn:
        with pytest.raises(BrokerError) as info:
            conn.call(proto.Grant("xdoc0", (0,), geometry=G))
        assert info.value.code == ErrorCode.BAD_REPLY
        with pytest.raises(BrokerError) as info:
            conn.call_typed(proto.Grant("xdoc0", (0,), geometry=G))
        assert info.value.code == ErrorCode.BAD_REPLY


def test_fds_a_reply_does_not_name_are_closed_not_handed_to_callers_that_ignore_them(fake_broker: Any) -> None:
    # the CLI reads status as `reply, _ = conn.call_typed(...)`, grant.request keeps only the fds it maps
    path, script = fake_broker
    script += [(STATUS, 1, 0), (STATUS, 2, 0), (bound("1111111111111111"), 3, 0), (bound("1111111111111111"), 3, 0)]
    before = null_fds()
    with Connection(path, timeout=5) as conn:
        _, fds = conn.call_typed(proto.Status())
        assert fds == []
        _, fds = conn.call(proto.Status())
        assert fds == []
        for call in (conn.call_typed, conn.call):
            _, fds = call(proto.Grant("xdoc0", (0,), geometry=G))
            assert len(fds) == 2
            for fd in fds:
                os.close(fd)
    assert null_fds() == before


@pytest.mark.parametrize("data", [b'{"v":1,"ok":1,"op":"release","lease":"x"}',
                                  b'{"v":1,"ok":"no","op":"release","lease":"x"}',
                                  b'{"v":true,"ok":true,"op":"release","lease":"x"}',
                                  b'{"v":1.0,"ok":true,"op":"release","lease":"x"}'])
def test_call_and_call_typed_agree_on_ok_and_v_of_another_type(fake_broker: Any, data: bytes) -> None:
    path, script = fake_broker
    script += [(data, 0, 0), (data, 0, 0)]
    with Connection(path, timeout=5) as conn:
        codes = []
        for call in (conn.call, conn.call_typed):
            try:
                call(proto.Release("x"))
                codes.append("accepted")
            except BrokerError as e:
                codes.append(e.code)
    assert codes[0] == codes[1], json.loads(data)
