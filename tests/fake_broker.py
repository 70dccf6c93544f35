"""Fake brokers for the client's tests: a SEQPACKET listener in a thread that takes one connection and answers
on it as a subclass's serve() says; and the scripted one several test modules share."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from xskbroker.wire import protocol as proto


class FakeBroker:
    """Listens at path from construction on. A subclass sets what serve() reads before calling this: the thread
    starts here (serve() itself runs only once a client has connected)."""

    def __init__(self, path: str) -> None:
        self.accepted = threading.Event()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        self.accepted.set()
        with conn:
            self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


B = TypeVar("B", bound=FakeBroker)


def serving(cls: type[B], tmp_path: Path) -> Iterator[tuple[str, B]]:
    """A fixture's body: (socket path, a cls listening there), its listener closed after."""
    path = str(tmp_path / "broker.sock")
    fake = cls(path)
    yield path, fake
    fake.listener.close()


def send_null_fds(conn: socket.socket, reply: bytes, count: int) -> None:
    """reply with count fds open on /dev/null; this side's copies are closed even when the send fails."""
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
    try:
        socket.send_fds(conn, [reply], fds)
    finally:
        for fd in fds:
            os.close(fd)


def null_fds() -> int:
    """This process's fds open on /dev/null, once a fake broker's thread has closed its own copies."""
    time.sleep(0.05)
    out = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out += os.readlink(f"/proc/self/fd/{fd}") == os.devnull
    return out


class ScriptedBroker(FakeBroker):
    """Answers each request with the next (reply, fd count[, seconds to wait first]) of its script, the fds open
    on /dev/null; stops reading when the script runs out."""

    def __init__(self, path: str) -> None:
        self.script: list[Any] = []
        super().__init__(path)

    def serve(self, conn: socket.socket) -> None:
        while self.script and conn.recv(proto.MAX_REQUEST + 1):
            reply, nfds, *wait = self.script.pop(0)
            time.sleep(wait[0] if wait else 0.0)
            with contextlib.suppress(OSError):  # a client that timed out has closed
                send_null_fds(conn, reply, nfds)


@pytest.fixture
def fake_broker(tmp_path: Path) -> Iterator[tuple[str, list[Any]]]:
    """(socket path, script) of a ScriptedBroker; the test fills the script before it connects."""
    path = str(tmp_path / "broker.sock")
    fake = ScriptedBroker(path)
    yield path, fake.script
    fake.listener.close()
    fake.thread.join(5)
