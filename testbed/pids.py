"""Landing a forked process on a chosen pid, for the tests that reuse a pid for real.

Root chooses the next pid of its namespace through /proc/sys/kernel/ns_last_pid. The write and the fork are two
steps, and every other process forking between them (the other test worker, a broker, an `ip`) takes the pid
instead; a short-lived one gives it back soon, a long-lived one (another test's QEMU) keeps it for the rest of the
scenario. Then the scenario cannot go on at that pid: it is run again from the start on a new one (PidTaken).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

TAKEN_FOR = 2.0  # seconds another process may hold the pid before the scenario gives it up


class PidTaken(Exception):
    """Another process took the pid first and kept it: the scenario must start again on a new pid."""


def fork_on(pid: int, tries: int = 20000) -> int:
    """os.fork() whose child has exactly this pid (free now). Returns 0 in the child, once it is known to have
    landed on the pid (a child that missed exits unseen), and the pid in the parent."""
    taken_since: float | None = None
    for _ in range(tries):
        go_r, go_w = os.pipe()
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        child = os.fork()
        if child == 0:
            os.close(go_w)
            landed = os.read(go_r, 1) == b"y"
            os.close(go_r)
            if not landed:
                os._exit(0)
            return 0
        os.close(go_r)
        if child == pid:
            os.write(go_w, b"y")
            os.close(go_w)
            return pid
        os.close(go_w)  # the child that missed reads end of file and exits
        os.waitpid(child, 0)
        if Path(f"/proc/{pid}").exists():  # not ours: someone forked between the write and our fork
            now = time.monotonic()
            if taken_since is None:
                taken_since = now
            elif now - taken_since > TAKEN_FOR:
                raise PidTaken(f"pid {pid} was taken by another process ({_comm(pid)}) and kept")
            time.sleep(0.001)
        else:
            taken_since = None
    raise AssertionError(f"pid {pid} never came round again in {tries} forks")


def fork_on_with_pipe(pid: int) -> tuple[int, int, int]:
    """fork_on(pid) with a pipe made before the fork, for the child to report through: (fork_on's return, the read
    end, the write end). A pid another process took leaks neither end."""
    r, w = os.pipe()
    try:
        return fork_on(pid), r, w
    except BaseException:
        os.close(r)
        os.close(w)
        raise


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone since"


def on_a_free_pid(scenario: Callable[[], T], attempts: int = 3) -> T:
    """Run scenario(), again from its start when the pid it was to reuse was taken by another process."""
    for n in range(attempts):
        try:
            return scenario()
        except PidTaken as e:
            print(f"attempt {n + 1}: {e}; the scenario runs again on a new pid")
    raise AssertionError(f"the pid to reuse was taken by another process in each of {attempts} attempts")
