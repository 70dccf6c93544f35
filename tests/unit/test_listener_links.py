"""The listening socket's node swapped, between bind() and chmod(), for a hard link to another root-owned socket
(another service's: /run/docker.sock, say). Where fs.protected_hardlinks is off (some containers) whoever can
write the socket's directory may link any file; the link is made here by root, in the window, as they would."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker.listener import listen


def test_socket_swapped_for_a_hard_link_after_bind_is_not_chmodded_through(monkeypatch: pytest.MonkeyPatch
                                                                          ) -> None:
    d = Path(tempfile.mkdtemp(prefix="xskl-"))
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.mkdir(d / "svc", 0o700)
        old = os.umask(0o177)
        try:
            other.bind(str(d / "svc" / "other.sock"))  # another service's socket: 0600, root's
        finally:
            os.umask(old)
        path = d / "broker.sock"
        real_bind = socket.socket.bind

        def bind_then_swap(self: socket.socket, address: Any) -> None:
            real_bind(self, address)
            if address == str(path):
                os.rename(address, f"{address}.moved")
                os.link(d / "svc" / "other.sock", address)

        monkeypatch.setattr(socket.socket, "bind", bind_then_swap)
        with pytest.raises(FileExistsError, match="was replaced while it was being created"):
            listen(str(path), 0o666, 65534)
        st = os.stat(d / "svc" / "other.sock")
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, os.getegid())
    finally:
        other.close()
        shutil.rmtree(d, ignore_errors=True)
