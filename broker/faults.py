"""Fault injection for the crash tests, as a hook the wiring is given (default: no faults).

A fault hook is called with the name of each point a grant passes ("after-socket", "after-map-claim",
"after-umem-reg", "before-bind", "after-bind", "after-lease-saved", "before-send", "after-send"; "queue-count", on a
worker: the kernel asked for an interface's queue count; "queue-look", on a worker: asked which queues are bound, for
a grant whose queue stayed busy), a revoke
("mid-revoke": journaled, its slots not yet emptied), a map grant ("after-pin": its map pinned, the lease not yet
journaled), a bare grant's memlock raise ("after-memlock-raise": made, the lease not yet journaled) and the start
("ready": said, the loop not yet running).
`from_spec` builds the hook the crash tests ask for:
"<point>" makes the broker SIGKILL itself there; "<point>:pause" makes it sleep a second there,
"<point>:pause=SECONDS" that long (so a test can, say, delete the interface mid-grant); "<point>:raise=PATH"
raises there while PATH exists (a bug standing in); "<point>:hold=PATH" makes the first grant there once
PATH.armed exists wait (creating PATH.held) until PATH exists, others passing by (so a test can prove that other
grants go on meanwhile, with no timing involved). Nothing here reads the environment: the daemon reads its
test-only variable once at start-up and passes the hook on.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

FaultHook = Callable[[str], None]
ENV = "XSKBROKER_FAULT"  # read by broker.daemon only


def none(name: str) -> None:
    """No fault anywhere."""


def from_spec(spec: str) -> FaultHook:
    """The hook for "<point>" (SIGKILL there), "<point>:pause" (sleep 1 s there; "pause=0.4", 0.4 s),
    "<point>:raise=PATH" or "<point>:hold=PATH"; "" is no fault (ValueError for a pause that is no number)."""
    armed, _, action = spec.partition(":")
    if not armed:
        return none
    held = threading.Lock()  # the first caller of a hold point takes it and never gives it back
    pause = 1.0 if action == "pause" else float(action[len("pause="):]) if action.startswith("pause=") else None

    def point(name: str) -> None:
        if name != armed:
            return
        if action.startswith("hold="):
            path = action[len("hold="):]
            if os.path.exists(path + ".armed") and held.acquire(blocking=False):
                with open(path + ".held", "w"):
                    pass
                while not os.path.exists(path):
                    time.sleep(0.005)
        elif pause is not None:
            time.sleep(pause)
        elif action.startswith("raise="):
            if os.path.exists(action[len("raise="):]):
                raise RuntimeError(f"fault injected at {name}")
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    return point
