"""The broker, asked as QEMU's user: a forked child that drops to that user, asks the broker, and hands the fds
back to the worker. The two speak one JSON object per SEQPACKET message, fds with SCM_RIGHTS:

  worker -> agent  {"op": "grant", "interface", "queues", "start_queue", "holder_pid", "memlock"}
                   {"op": "release", "lease"}
  agent -> worker  {"ok": true, "reply": BROKER-REPLY} + the grant's fds
                   {"ok": false, "code", "message"}    (the broker's error, or why it could not be asked)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any, Protocol

from xskbroker.client.hotplug import close_fds
from xskbroker.client.libvirt.identity import Identity, drop_to
from xskbroker.common.libc import PR_SET_PDEATHSIG, libc
from xskbroker.wire import protocol as proto


def _serve_agent(sock: socket.socket, socket_path: str, timeout: float) -> int:
    """The agent's loop: one request from the worker per message, one answer (with any fds) per request."""
    from xskbroker.client.connection import Connection
    from xskbroker.client.grant import request_fds

    while True:
        data = sock.recv(1 << 16)
        if not data:
            return 0
        cmd = json.loads(data)
        fds: list[int] = []
        try:
            if cmd["op"] == "grant":
                reply, fds = request_fds(cmd["interface"], cmd["queues"], kind="bare", start_queue=cmd["start_queue"],
                                         socket_path=socket_path, timeout=timeout, memlock=cmd["memlock"],
                                         holder_pid=cmd["holder_pid"])
            else:
                with Connection(socket_path, timeout) as conn:
                    reply, fds = conn.call(proto.Release(cmd["lease"]))
            out: dict[str, Any] = {"ok": True, "reply": reply}
        except proto.BrokerError as e:
            out = {"ok": False, "code": e.code, "message": e.message}
        except TimeoutError:
            out = {"ok": False, "code": "broker-timeout",
                   "message": f"the broker at {socket_path} did not answer within {timeout:g} s"}
        except OSError as e:  # ConnectionError included
            out = {"ok": False, "code": "connection-error", "message": str(e)}
        try:
            data = json.dumps(out).encode()
            if fds:
                socket.send_fds(sock, [data], fds)
            else:
                sock.send(data)
        finally:
            close_fds(fds)


def join_cgroup_of(pid: int) -> None:
    """Move this (still root) process into pid's cgroup v2: the broker judges a requester by its cgroup too, and
    accepts a holder only from the requester's own cgroup, so the agent must ask from QEMU's (the VM's scope),
    not from libvirtd's, where the hook runs. A host without the unified hierarchy has nothing to join."""
    with open(f"/proc/{pid}/cgroup") as f:
        path = next((line[3:].rstrip("\n") for line in f if line.startswith("0::")), None)
    root = next((r for r in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup") if os.path.exists(f"{r}/cgroup.procs")), None)
    if path is None or root is None:
        return
    with open(f"{root}{path.rstrip('/')}/cgroup.procs", "w") as procs:
        procs.write("0\n")  # 0: the writer itself


class BrokerAgent:
    """A child process that asks the broker as `ident` (QEMU's user) and hands the fds back (SCM_RIGHTS).

    The broker's policy then judges the VM's user, not root, and the hook's root privileges are never
    presented to the broker. The child dies with its parent (PR_SET_PDEATHSIG).
    """

    def __init__(self, ident: Identity, socket_path: str, timeout: float, join: int | None = None) -> None:
        self.ident, self.socket_path, self.timeout = ident, socket_path, timeout
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        me = os.getpid()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        pid = os.fork()
        if pid == 0:
            code = 2
            try:
                parent.close()
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                if os.getppid() != me:
                    os._exit(code)
                if join is not None:
                    try:
                        join_cgroup_of(join)
                    except OSError as e:  # asked from here instead: the broker says why if that is refused
                        print(f"cannot join the cgroup of QEMU pid {join}: {e}", file=sys.stderr)
                drop_to(ident)
                code = _serve_agent(child, socket_path, timeout)
            except BaseException:
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
            finally:
                os._exit(code)
        child.close()
        self.pid, self.sock = pid, parent

    def _call(self, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        self.sock.settimeout(self.timeout + 5)
        try:
            self.sock.send(json.dumps(msg).encode())
            data, fds, _, _ = socket.recv_fds(self.sock, proto.MAX_REPLY, proto.MAX_QUEUES)
        except OSError as e:
            raise proto.BrokerError("agent-failed", f"the process asking the broker as {self.ident} failed: "
                                    f"{e.strerror or e}") from None
        if not data:
            raise proto.BrokerError("agent-failed", f"the process asking the broker as {self.ident} exited "
                                    "(its traceback is in the log)")
        out = json.loads(data)
        if not out.get("ok"):
            close_fds(fds)
            raise proto.BrokerError(str(out.get("code")), str(out.get("message")))
        return out["reply"], fds

    def grant(self, interface: str, queues: int, start_queue: int, holder_pid: int,
              memlock: int) -> tuple[dict[str, Any], list[int]]:
        return self._call({"op": "grant", "interface": interface, "queues": queues, "start_queue": start_queue,
                           "holder_pid": holder_pid, "memlock": memlock})

    def release(self, lease: str) -> dict[str, Any]:
        reply, fds = self._call({"op": "release", "lease": lease})
        close_fds(fds)
        return reply

    def close(self) -> None:
        self.sock.close()
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                return
            time.sleep(0.01)

    def __enter__(self) -> BrokerAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Granter(Protocol):
    """What the worker needs of BrokerAgent (tests give it a fake)."""

    socket_path: str
    ident: Identity

    def grant(self, interface: str, queues: int, start_queue: int, holder_pid: int,
              memlock: int) -> tuple[dict[str, Any], list[int]]: ...

    def release(self, lease: str) -> dict[str, Any]: ...

    def close(self) -> None: ...
