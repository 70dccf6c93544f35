"""QMP's wire format, sans-IO: command encoding, stream framing, reply and event parsing, and the errors.

One codec for every transport that reaches QEMU's monitor: the QMP socket client (qmp.py) frames a byte stream
with it; the libvirt hook's `virsh qemu-monitor-command` adapter encodes the command for --cmd and reads the
reply virsh prints. Neither writes QMP JSON by hand.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

MAX_MESSAGE = 64 << 20  # query-qmp-schema is ~0.3 MiB on QEMU 7.2-10.0; anything huge is a broken peer


class QMPError(Exception):
    """QEMU answered a command with an error. str() is QEMU's own `desc`, untouched."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPConnectionError(ConnectionError):
    """The monitor is unreachable, closed the connection, or sent something that is not QMP."""


class QMPTimeout(TimeoutError):
    """No answer (or no awaited event) in time. The connection stays usable: a late reply is discarded."""


def command_json(command: str, arguments: Mapping[str, Any] | None = None, cmd_id: Any = None) -> str:
    """One command as compact JSON text, without the line end."""
    msg: dict[str, Any] = {"execute": command}
    if arguments is not None:
        msg["arguments"] = dict(arguments)
    if cmd_id is not None:
        msg["id"] = cmd_id
    return json.dumps(msg, separators=(",", ":"))


def encode_command(command: str, arguments: Mapping[str, Any] | None = None, cmd_id: Any = None) -> bytes:
    """One command as it goes on a QMP stream: a line."""
    return command_json(command, arguments, cmd_id).encode() + b"\n"


def parse_message(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise QMPConnectionError(f"the monitor sent something that is not JSON: {line[:80]!r} ({e})") from None
    if not isinstance(msg, dict):
        raise QMPConnectionError(f"the monitor sent a JSON {type(msg).__name__}, not an object")
    return msg


def is_event(msg: Mapping[str, Any]) -> bool:
    return "event" in msg


def reply_value(command: str, msg: Mapping[str, Any], unexpected: Callable[[], str]) -> Any:
    """A reply's `return` value; QMPError with QEMU's own desc for an `error`; QMPConnectionError(unexpected())
    for a message that is neither (the transport words that: it knows where the message came from)."""
    if "return" in msg:
        return msg["return"]
    if "error" in msg:
        err = msg["error"] if isinstance(msg["error"], dict) else {}
        raise QMPError(command, str(err.get("class", "GenericError")), str(err.get("desc", "")))
    raise QMPConnectionError(unexpected())


class Framer:
    """Splits a QMP byte stream into messages: one JSON object per line, blank lines skipped."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline: a long line fed in chunks is scanned once

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_MESSAGE:
            raise QMPConnectionError(f"a QMP message from {self.peer} exceeds {MAX_MESSAGE} bytes")

    def next(self) -> dict[str, Any] | None:
        """The next whole message, or None until more bytes are fed."""
        while (end := self._buf.find(b"\n", self._scanned)) >= 0:
            line = bytes(self._buf[:end])
            del self._buf[:end + 1]
            self._scanned = 0
            if line.strip():
                return parse_message(line)
        self._scanned = len(self._buf)
        return None
