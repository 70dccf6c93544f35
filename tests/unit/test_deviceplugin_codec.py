"""The device plugin's handshake codec (wire.deviceplugin): DPDK's exchange, and what hostile input gets."""

from __future__ import annotations

import pytest

from xskbroker.wire import deviceplugin as dp


def _connected() -> dp.Session:
    s = dp.Session()
    step = s.feed(b"/connect,host-1")
    assert step.ask == dp.Connect("host-1") and step.reply is None
    assert s.answer(True) == b"/host_ok"
    return s


def test_dpdks_exchange_in_order() -> None:
    s = _connected()
    assert s.feed(b"/version").reply == b"0.1"
    step = s.feed(b"/xsk_map_fd,eth1")
    assert step.ask == dp.MapFd("eth1")
    assert s.answer(True) == b"/fd_ack"
    fin = s.feed(b"/fin")
    assert fin.reply == b"/fin_ack" and fin.done
    assert s.state == "finished"


def test_one_connection_may_ask_for_the_map_again() -> None:
    s = _connected()
    for _ in range(2):
        assert s.feed(b"/xsk_map_fd,eth1").ask == dp.MapFd("eth1")
        assert s.answer(False) == b"/fd_nak"


def test_a_refused_connect_refuses_the_map_without_asking() -> None:
    s = dp.Session()
    s.feed(b"/connect,h")
    assert s.answer(False) == b"/host_nak"
    step = s.feed(b"/xsk_map_fd,eth1")
    assert step.ask is None and step.reply == b"/fd_nak" and step.refused
    assert s.feed(b"/connect,h").reply == b"/nak"  # no second try on the same connection


@pytest.mark.parametrize("msg, reply", [
    (b"/xsk_map_fd,eth1", b"/fd_nak"),  # before /connect
    (b"/config_busy_poll,10,64", b"/config_busy_poll_nak"),
    (b"/connect", b"/host_nak"),  # no hostname
    (b"/connect,", b"/host_nak"),
    (b"/connect,a,b", b"/host_nak"),
    (b"/nope", b"/nak"),
    (b"version", b"/nak"),
    (b"/version,1", b"/nak"),
    (b"/fin,now", b"/nak"),
    (b"/connect,h\x00", b"/host_nak"),  # NUL: DPDK's snprintf("%s") cannot send one
    (b"\xff\xfe\x00garbage", b"/nak"),
    (b"", b"/nak"),
])
def test_hostile_or_out_of_order_messages_get_a_refusal_and_no_question(msg: bytes, reply: bytes) -> None:
    step = dp.Session().feed(msg)
    assert step.ask is None and step.reply == reply and step.refused


@pytest.mark.parametrize("raw, recorded", [
    (b"/connect,dpdk host", "dpdk host"),  # the plugin takes it too (it drops the spaces)
    ("/connect,hôte".encode(), "h\\xc3\\xb4te"),
    (b"/connect,h\n\x7f", "h\\x0a\\x7f"),
])
def test_any_hostname_linux_allows_is_taken_and_recorded_escaped(raw: bytes, recorded: str) -> None:
    """sethostname(2) takes any bytes; the name identifies nobody, so none of them refuses a handshake."""
    s = dp.Session()
    assert s.feed(raw).ask == dp.Connect(recorded) and s.hostname == recorded
    assert s.answer(True) == b"/host_ok"


@pytest.mark.parametrize("msg, fds, truncated", [
    (b"/connect,h", 1, False),
    (b"/connect," + b"h" * 56, 0, False),  # 65 bytes
    (b"/connect,h", 0, True),
    (b"/connect,a,b", 0, False),
    (b"/connect,h\x00", 0, False),
])
def test_every_connect_refusal_is_host_nak_which_dpdk_reads_as_failure(msg: bytes, fds: int, truncated: bool) -> None:
    """DPDK's check is strncmp(reply, "/host_ok", 8) < 0: /nak sorts after /host_ok and would read as success
    (DPDK then goes on to /xsk_map_fd, and uses fd 0 as its map on the /fd_nak it gets)."""
    step = dp.Session().feed(msg, fds=fds, truncated=truncated)
    assert step.reply == b"/host_nak" and step.ask is None and step.refused
    assert step.reply < b"/host_ok" < b"/nak"


def test_over_long_messages_are_refused_whatever_they_say() -> None:
    s = dp.Session()
    assert s.feed(b"/connect," + b"h" * 55).ask is not None  # 64 bytes: DPDK's most
    s2 = dp.Session()
    assert s2.feed(b"/version" + b"x" * 57).reply == b"/nak"  # 65
    assert s2.feed(b"/version", truncated=True).reply == b"/nak"  # the kernel cut it
    assert s2.state == "new"


def test_fds_attached_where_none_belong_are_refused() -> None:
    s = _connected()
    step = s.feed(b"/xsk_map_fd,eth1", fds=1)
    assert step.reply == b"/nak" and step.ask is None
    assert dp.Session().feed(b"/connect,h", fds=3).reply == b"/host_nak"


def test_busy_poll_needs_its_xsk_fd_and_two_numbers() -> None:
    s = _connected()
    assert s.feed(b"/config_busy_poll,20,64").reply == b"/config_busy_poll_nak"  # no fd
    assert s.feed(b"/config_busy_poll,20", fds=1).reply == b"/config_busy_poll_nak"
    assert s.feed(b"/config_busy_poll,-1,64", fds=1).reply == b"/config_busy_poll_nak"
    assert s.feed(b"/config_busy_poll,9999999999,64", fds=1).reply == b"/config_busy_poll_nak"
    step = s.feed(b"/config_busy_poll,20,64", fds=1)
    assert step.ask == dp.BusyPoll(20, 64)
    assert s.answer(False) == b"/config_busy_poll_nak"


def test_interface_names_the_kernel_could_not_have_are_refused() -> None:
    for name in (b"", b"x" * 16, b".", b".."):
        s = _connected()
        assert s.feed(b"/xsk_map_fd," + name).reply == b"/fd_nak"


def test_nothing_but_nak_after_fin() -> None:
    s = _connected()
    s.feed(b"/fin")
    for msg in (b"/version", b"/xsk_map_fd,eth1", b"/fin"):
        assert s.feed(msg).reply == b"/nak"


def test_an_open_question_must_be_answered_first() -> None:
    s = dp.Session()
    s.feed(b"/connect,h")
    with pytest.raises(RuntimeError):
        s.feed(b"/version")
    s.answer(True)
    with pytest.raises(RuntimeError):
        s.answer(True)


def test_every_reply_fits_dpdks_buffer() -> None:
    replies = [v for k, v in vars(dp).items() if k.isupper() and isinstance(v, bytes)]
    assert replies and all(len(r) < dp.MAX_REPLY and b"\0" not in r for r in replies)
