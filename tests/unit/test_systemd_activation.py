"""Socket activation (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES) as broker.systemd reads it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from xskbroker.broker import systemd
from xskbroker.broker.systemd import PassedFd, parse_listen_env

ROOT = Path(__file__).resolve().parents[2]


def test_nothing_passed_when_unset_or_for_another_process() -> None:
    assert parse_listen_env({}, 100) == []
    assert parse_listen_env({"LISTEN_FDS": "1"}, 100) == []  # no LISTEN_PID: inherited, not ours
    assert parse_listen_env({"LISTEN_PID": "99", "LISTEN_FDS": "1"}, 100) == []


def test_fds_start_at_3_with_their_names() -> None:
    env = {"LISTEN_PID": "100", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "broker:other"}
    assert parse_listen_env(env, 100) == [PassedFd(3, "broker"), PassedFd(4, "other")]
    assert parse_listen_env({"LISTEN_PID": "100", "LISTEN_FDS": "1"}, 100) == [PassedFd(3, "unknown")]
    assert parse_listen_env({"LISTEN_PID": "100", "LISTEN_FDS": "0"}, 100) == []


@pytest.mark.parametrize("env", [
    {"LISTEN_PID": "x", "LISTEN_FDS": "1"},
    {"LISTEN_PID": "100", "LISTEN_FDS": "one"},
    {"LISTEN_PID": "100", "LISTEN_FDS": "-1"},
    {"LISTEN_PID": "100", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "only-one"},
])
def test_malformed_variables_are_errors(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        parse_listen_env(env, 100)


def test_listen_fds_unsets_the_variables_and_sets_cloexec(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    try:
        os.set_inheritable(r, True)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "OTHER": "1"}
        # as if the pipe were fd 3: the side effects are checked on a real descriptor
        monkeypatch.setattr(systemd, "parse_listen_env", lambda e, p: [PassedFd(r, "x")])
        assert systemd.listen_fds(env) == [PassedFd(r, "x")]
        assert env == {"OTHER": "1"}
        assert not os.get_inheritable(r)
    finally:
        os.close(r)
        os.close(w)


def test_picks_the_seqpacket_listener_and_refuses_a_wrong_socket(tmp_path: Path) -> None:
    seq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    seq.bind(str(tmp_path / "s"))
    seq.listen()
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(tmp_path / "t"))
    stream.listen()
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        got = systemd.seqpacket_listener([PassedFd(stream.fileno(), "a"), PassedFd(seq.fileno(), "b")])
        assert got is not None and got.fileno() == seq.fileno()
        got.detach()
        assert systemd.seqpacket_listener([]) is None
        with pytest.raises(systemd.ActivationError, match="ListenSequentialPacket"):
            systemd.seqpacket_listener([PassedFd(stream.fileno(), "a"), PassedFd(unbound.fileno(), "b")])
    finally:
        for s in (seq, stream, unbound):
            s.close()


def test_two_listeners_are_told_apart_by_name(tmp_path: Path) -> None:
    socks = []
    for name in ("a", "b"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind(str(tmp_path / name))
        s.listen()
        socks.append(s)
    try:
        passed = [PassedFd(socks[0].fileno(), "metrics"), PassedFd(socks[1].fileno(), "broker")]
        got = systemd.seqpacket_listener(passed)
        assert got is not None and got.fileno() == socks[1].fileno()
        got.detach()
        with pytest.raises(systemd.ActivationError, match="FileDescriptorName"):
            systemd.seqpacket_listener([PassedFd(s.fileno(), "x") for s in socks])
    finally:
        for s in socks:
            s.close()


def test_a_real_passed_fd_3_in_a_fresh_process(tmp_path: Path) -> None:
    """The whole path in a child whose fd 3 and environment are set as a service manager sets them."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(tmp_path / "broker.sock"))
    listener.listen()
    code = ("import json, os; from broker import systemd; p = systemd.listen_fds(); s = systemd.seqpacket_listener(p);"
            "print(json.dumps({'passed': [[x.fd, x.name] for x in p], 'name': s.getsockname(),"
            "'env': sorted(k for k in os.environ if k.startswith('LISTEN_'))}))")
    # the shell moves the socket from stdin to fd 3 and names its own pid, which python then keeps
    script = 'exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=broker exec "$@"'
    done = subprocess.run(["sh", "-c", script, "sh", sys.executable, "-c", code], stdin=listener.fileno(),
                          capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    listener.close()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"passed": [[3, "broker"]], "name": str(tmp_path / "broker.sock"), "env": []}
