"""Fault injection for the crash tests, as a hook the wiring is given (default: no faults).

A fault hook is called with the name of each point a grant passes ("after-socket", "after-map-claim",
"after-umem-reg", "after-bind", "after-lease-saved", "before-send", "after-send"). `from_spec` builds the
hook the crash tests ask for: "<point>" makes the broker SIGKILL itself there, "<point>:pause" makes it
sleep a second there (so a test can, say, delete the interface mid-grant). Nothing here reads the
environment: the daemon reads its test-only variable once at start-up and passes the hook on.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

FaultHook = Callable[[str], None]
ENV = "XSKBROKER_FAULT"  # read by broker.daemon only


def none(name: str) -> None:
    """No fault anywhere."""


def from_spec(spec: str) -> FaultHook:
    """The hook for "<point>" (SIGKILL there) or "<point>:pause" (sleep 1 s there); "" is no fault."""
    armed, _, action = spec.partition(":")
    if not armed:
        return none

    def point(name: str) -> None:
        if name != armed:
            return
        if action == "pause":
            time.sleep(1.0)
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    return point
