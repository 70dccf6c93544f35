"""The broker's helper processes (broker.preparer, broker.sent_copies): this interpreter running one of the
package's modules, talking to the broker over one end of a SEQPACKET socketpair whose fd number is its first
argument. Nothing of the broker is inherited but that socket (and the CPUs of the thread that starts it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def start(module: str, *args: str) -> tuple[socket.socket, subprocess.Popen[bytes]] | None:
    """The broker's end of the socket and the process; None when it cannot be started."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        # the broker's own import path: it may have found the package where the interpreter alone would not;
        # -P: not the working directory's modules, which whoever owns it could plant
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.Popen([sys.executable, "-P", "-m", module, str(theirs.fileno()), *args],
                                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True, env=env)
    except OSError:
        ours.close()
        return None
    finally:
        theirs.close()
    return ours, proc


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for a process told to stop (a helper: its socket closed) to exit; killed after `timeout` seconds."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
