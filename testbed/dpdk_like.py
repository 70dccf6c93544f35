"""The AF_XDP device plugin handshake exactly as DPDK's af_xdp PMD (drivers/net/af_xdp, uds_get_xskmap_fd)
makes it: socket(AF_UNIX, SOCK_SEQPACKET), connect(dp_path), then write() each request (snprintf into a
64-byte buffer: no NUL sent) and recvmsg() each reply into 128 bytes with room for one fd:
/connect,<gethostname()>, /version, /xsk_map_fd,<iface>, /fin. One connection per queue.
"""

from __future__ import annotations

import array
import os
import socket
import time
from typing import Any

UDS_MAX_CMD_LEN = 64
UDS_MAX_CMD_RESP = 128


def _request(sock: socket.socket, text: str) -> tuple[bytes, int | None]:
    data = text.encode()[:UDS_MAX_CMD_LEN - 1]  # snprintf(request, sizeof(request), ...)
    os.write(sock.fileno(), data)
    msg, anc, _, _ = sock.recvmsg(UDS_MAX_CMD_RESP, socket.CMSG_SPACE(4))
    fd = None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[:4])
            fd = fds[0]
    return msg, fd


def handshake(path: str, iface: str, timeout: float = 10.0, hostname: str | None = None) -> dict[str, Any]:
    """Run DPDK's exchange; returns every reply, the map fd (or None) and the time to it (ms). hostname: what
    gethostname() would give (default: this host's)."""
    started = time.perf_counter()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(timeout)
    out: dict[str, Any] = {"fd": None}
    try:
        sock.connect(path)
        host = socket.gethostname() if hostname is None else hostname
        out["connect"], _ = _request(sock, f"/connect,{host}")
        # check_response(): strncmp(response, "/host_ok", 8) < 0, so only a reply sorting below /host_ok
        # (/host_nak, /error) stops it: "Unexpected response"
        if out["connect"][:8] < b"/host_ok":
            return out
        out["version"], _ = _request(sock, "/version")
        out["map"], out["fd"] = _request(sock, f"/xsk_map_fd,{iface}")
        out["ms"] = (time.perf_counter() - started) * 1000
        out["fin"], _ = _request(sock, "/fin")
    finally:
        sock.close()
    return out
