"""The AF_XDP device plugin's handshake, as DPDK's af_xdp PMD speaks it (dp_path=, use_cni=): sans-IO.

AF_UNIX SOCK_SEQPACKET, one text message per packet, no NUL; the client writes at most 64 bytes and reads
at most 128, with room for one fd:

    /connect,<hostname>            -> /host_ok | /host_nak | /error
    /version                       -> 0.1
    /xsk_map_fd,<iface>            -> /fd_ack + the map fd (SCM_RIGHTS) | /fd_nak
    /config_busy_poll,<t>,<budget> -> /config_busy_poll_ack | /config_busy_poll_nak  (an XSK fd attached)
    /fin                           -> /fin_ack
    anything else                  -> /nak

The hostname is the client's word and identifies nobody: it is parsed only to be recorded, so any bytes
gethostname() can give (a space, UTF-8: Linux takes anything but NUL) are taken, and recorded escaped. A
/connect is refused only with /host_nak: DPDK checks its reply with strncmp(reply, "/host_ok", 8) < 0, so
/nak, which sorts after it, would read as success (it goes on and uses fd 0 as the map). A Session
follows one connection: feed() takes each message (its bytes, whether it was cut short, how many fds came
with it) and returns what to answer now, or the question the broker must decide first (Connect, MapFd,
BusyPoll), whose answer() gives the bytes to send.
"""

from __future__ import annotations

from xskbroker.common.records import record

MAX_REQUEST = 64  # DPDK's UDS_MAX_CMD_LEN: it never writes more
MAX_REPLY = 128  # DPDK's UDS_MAX_CMD_RESP
VERSION = b"0.1"
HOST_OK, HOST_NAK, ERROR = b"/host_ok", b"/host_nak", b"/error"
FD_ACK, FD_NAK = b"/fd_ack", b"/fd_nak"
FIN_ACK, NAK = b"/fin_ack", b"/nak"
BUSY_POLL_ACK, BUSY_POLL_NAK = b"/config_busy_poll_ack", b"/config_busy_poll_nak"
_PRINTABLE = frozenset(range(0x21, 0x7F))  # no space, no control, no NUL, ASCII only
IFNAMSIZ = 16
CONNECT = b"/connect"


@record(frozen=True)
class Connect:
    hostname: str  # the client's claim, recorded and never believed


@record(frozen=True)
class MapFd:
    interface: str


@record(frozen=True)
class BusyPoll:
    timeout_us: int
    budget: int


Question = Connect | MapFd | BusyPoll


@record(frozen=True)
class Step:
    """What feed() made of one message: bytes to send now, or a question for the broker (answer with
    Session.answer), and why a message was refused (for the audit), if it was."""

    reply: bytes | None = None
    ask: Question | None = None
    refused: str | None = None
    done: bool = False  # /fin answered: the client closes next


class Session:
    """One connection's handshake: new -> connected (after /host_ok) -> finished (after /fin)."""

    def __init__(self) -> None:
        self.state = "new"  # new | refused | connected | finished
        self.hostname: str | None = None
        self._asked: Question | None = None

    def feed(self, data: bytes, *, truncated: bool = False, fds: int = 0) -> Step:
        if self._asked is not None:  # the loop must not read while a question is open
            raise RuntimeError("a question is still open")
        if self.state == "new" and (data == CONNECT or data.startswith(CONNECT + b",")):
            return self._connect(data, truncated, fds)
        words, why = _split(data, truncated)
        if words is None:
            return Step(NAK, refused=why)
        cmd, args = words[0], words[1:]
        if fds and cmd != "/config_busy_poll":
            return Step(NAK, refused=f"{cmd}: {fds} fd(s) attached where none belong")
        if self.state == "finished":
            return Step(NAK, refused=f"{cmd} after /fin")
        if cmd == "/version" and not args:
            return Step(VERSION)
        if cmd == "/fin" and not args:
            self.state = "finished"
            return Step(FIN_ACK, done=True)
        if cmd == "/connect":  # a new session's went to _connect
            return Step(NAK, refused=f"/connect again ({self.state})")
        if cmd == "/xsk_map_fd":
            if self.state != "connected":
                return Step(FD_NAK, refused=f"/xsk_map_fd before /host_ok ({self.state})")
            if len(args) != 1 or not 0 < len(args[0]) < IFNAMSIZ or args[0] in (".", ".."):
                return Step(FD_NAK, refused="/xsk_map_fd needs one interface name")
            return self._ask(MapFd(args[0]))
        if cmd == "/config_busy_poll":
            if self.state != "connected":
                return Step(BUSY_POLL_NAK, refused=f"/config_busy_poll before /host_ok ({self.state})")
            numbers = [_uint(a) for a in args]
            if len(numbers) != 2 or None in numbers:
                return Step(BUSY_POLL_NAK, refused="/config_busy_poll needs <timeout>,<budget>")
            if fds != 1:
                return Step(BUSY_POLL_NAK, refused=f"/config_busy_poll needs one XSK fd, got {fds}")
            assert numbers[0] is not None and numbers[1] is not None
            return self._ask(BusyPoll(numbers[0], numbers[1]))
        return Step(NAK, refused=f"unknown request {cmd}")

    def _connect(self, data: bytes, truncated: bool, fds: int) -> Step:
        host = data[len(CONNECT) + 1:]
        if truncated or len(data) > MAX_REQUEST:
            why = f"longer than {MAX_REQUEST} bytes"
        elif fds:
            why = f"/connect: {fds} fd(s) attached where none belong"
        elif not host or b"," in host or b"\0" in host:  # a comma: the plugin's parser refuses it too
            why = "/connect needs exactly one hostname"
        else:
            self.hostname = _escaped(host)
            return self._ask(Connect(self.hostname))
        self.state = "refused"
        return Step(HOST_NAK, refused=why)

    def answer(self, ok: bool) -> bytes:
        """The reply to the open question, as the broker decided it."""
        asked, self._asked = self._asked, None
        if isinstance(asked, Connect):
            self.state = "connected" if ok else "refused"
            return HOST_OK if ok else HOST_NAK
        if isinstance(asked, MapFd):
            return FD_ACK if ok else FD_NAK
        if isinstance(asked, BusyPoll):
            return BUSY_POLL_ACK if ok else BUSY_POLL_NAK
        raise RuntimeError("no question is open")

    def _ask(self, q: Question) -> Step:
        self._asked = q
        return Step(ask=q)


def _split(data: bytes, truncated: bool) -> tuple[list[str] | None, str]:
    if truncated or len(data) > MAX_REQUEST:
        return None, f"longer than {MAX_REQUEST} bytes"
    if not data:
        return None, "empty"
    bad = next((b for b in data if b not in _PRINTABLE), None)
    if bad is not None:
        return None, f"byte 0x{bad:02x} is not printable ASCII"
    text = data.decode("ascii")
    if not text.startswith("/"):
        return None, "not a /command"
    return text.split(","), ""


def _escaped(raw: bytes) -> str:
    """Printable ASCII as sent, every other byte as \\xNN: what the audit records of a client's word."""
    return "".join(chr(b) if b in _PRINTABLE or b == 0x20 else f"\\x{b:02x}" for b in raw)


def _uint(text: str) -> int | None:
    if not text.isdigit() or len(text) > 9:
        return None
    return int(text)
