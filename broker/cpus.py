"""Which CPUs answer clients and which do the broker's slow kernel work.

Closing the last fd of a bound AF_XDP socket makes the kernel release its UMEM (unpin and unmap every page)
in a work item queued on the closing CPU a grace period later: ~1.5 ms for 16 MiB, and on a kernel without
preemption nothing else runs on that CPU meanwhile. Making a UMEM (zeroing and pinning its pages: the pool's
helper, a large grant's child) is as slow. Where the broker may use two CPUs or more, the threads that do that
work (closers, the UMEM pool, the heavy workers, and the processes they start) run on one of them and the
event loop and the bind workers on the others, so that no grant waits behind a release or a pin it did not ask
for. With one CPU there is nothing to split; where the kernel refuses (a cpuset that changed meanwhile, a
seccomp filter without sched_setaffinity) the scheduler places everything, as before.
"""

from __future__ import annotations

import contextlib
import os


def split(allowed: frozenset[int]) -> tuple[frozenset[int], frozenset[int]] | None:
    """(serving, background) CPUs out of those the broker may use: the last one does the background work;
    None with fewer than two."""
    if len(allowed) < 2:
        return None
    background = frozenset({max(allowed)})
    return allowed - background, background


_plan: tuple[frozenset[int], frozenset[int]] | None = None


def configure(enabled: bool = True) -> tuple[frozenset[int], frozenset[int]] | None:
    """Decide the split from this process's affinity; None when there is none (one CPU, disabled, or the kernel
    refuses). Threads started from now on move themselves (serving(), background()); the caller, the event
    loop's thread, stays where it is until it calls serving(): pinned now, it would wait for its CPU behind each
    thread it starts, which runs there until it moves."""
    global _plan
    _plan = None
    if not enabled:
        return None
    allowed = frozenset(os.sched_getaffinity(0))
    plan = split(allowed)
    if plan is not None and _pin(allowed):  # no change yet: only whether the kernel lets us
        _plan = plan
    return _plan


def serving() -> None:
    """Keep the calling thread on the serving CPUs."""
    if _plan is not None:
        _pin(_plan[0])


def background() -> None:
    """Move the calling thread, and the processes it starts from now on, to the background CPU."""
    if _plan is not None:
        _pin(_plan[1])


def background_cpus() -> frozenset[int] | None:
    """The background CPUs, for a helper process started from a serving thread to move to; None: not split."""
    return _plan[1] if _plan is not None else None


def pin(cpus: frozenset[int]) -> bool:
    """Move the calling thread (and what it starts from now on) to cpus; False where the kernel refuses."""
    return _pin(cpus)


def _pin(cpus: frozenset[int]) -> bool:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, cpus)  # pid 0: the calling thread alone
        return True
    return False
