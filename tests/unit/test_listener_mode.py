"""The listening socket's file is the broker's access control: its mode and group are exactly what was asked for
(0660 by default), whatever the umask, and the node is closed to everyone between bind() and chmod()."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker.listener import listen


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_the_default_mode_is_0660_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "broker.sock"
    old = os.umask(umask)
    try:
        sock = listen(str(path))
    finally:
        os.umask(old)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert (_mode(path), st.st_uid) == (0o660, os.geteuid())
    finally:
        sock.close()


def _another_group() -> int | None:
    """A gid this process may give its file that is not the one the file gets anyway (the egid)."""
    if os.geteuid() == 0:
        return 65534
    return next((g for g in os.getgroups() if g != os.getegid()), None)


@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
def test_the_mode_and_group_asked_for_are_the_files(tmp_path: Path, mode: int) -> None:
    group = _another_group()
    if group is None:
        pytest.skip("needs root, or a supplementary group, to give the socket a group other than the egid")
    path = tmp_path / "broker.sock"
    sock = listen(str(path), mode, group)
    try:
        st = os.lstat(path)
        assert (_mode(path), st.st_gid) == (mode, group)
    finally:
        sock.close()


def test_the_node_is_closed_to_everyone_until_it_is_chmodded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "broker.sock"
    real_bind = socket.socket.bind
    seen: list[int] = []

    def bind_and_look(self: socket.socket, address: Any) -> None:
        real_bind(self, address)
        if address == str(path):
            seen.append(_mode(path))

    monkeypatch.setattr(socket.socket, "bind", bind_and_look)
    old = os.umask(0o000)  # the most open umask a broker could inherit
    try:
        sock = listen(str(path), 0o660)
    finally:
        os.umask(old)
    try:
        assert seen == [0o000]  # made unreachable, then opened to the group by chmod
        assert _mode(path) == 0o660
    finally:
        sock.close()
