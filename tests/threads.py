"""A test body on a thread of its own: what it changes about its thread (its CPU affinity) stays there."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any


def on_own_thread(body: Callable[[], Any], cpus: set[int] | None = None) -> Any:
    """body()'s result (or its exception), run on a new thread, limited to cpus first if given: a process it
    starts inherits them."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)
            out.append(body())
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out[0]
