"""Fault injection for the crash tests.

XSKBROKER_FAULT=<point> makes the broker SIGKILL itself at that point; XSKBROKER_FAULT=<point>:pause
makes it sleep there for a second (so a test can, say, delete the interface mid-grant). Read once at
import; with the variable unset every point is a no-op.
"""

from __future__ import annotations

import os
import signal
import time

_ARMED, _, _ACTION = os.environ.get("XSKBROKER_FAULT", "").partition(":")


def point(name: str) -> None:
    if name != _ARMED:
        return
    if _ACTION == "pause":
        time.sleep(1.0)
    else:
        os.kill(os.getpid(), signal.SIGKILL)
