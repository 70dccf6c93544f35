"""Kernel work too slow for the event loop: registering a large UMEM pins every page (3 s for 1 GiB here).

A few threads run such jobs (the syscalls release the GIL) while the loop keeps serving; a finished job
writes a byte to a socketpair the loop watches, and the loop completes the request there, so leases and
quotas stay single-threaded. A job the broker gives up on (it is stopping) is undone by whoever sees
it last: the loop if the job had finished, else the worker once its step ends (a child process pinning
pages is killed, which ends it at once). A broker that exits meanwhile loses nothing either: its fds
close, which unpins the pages and empties the slots, and a child dies with the thread that forked it.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable

from xskbroker.broker import cpus

THREADS = 4  # for heavy jobs: pinning a large UMEM (seconds)
LIGHT_THREADS = 8  # for the rest: binds, small registrations (a few ms at most), so grants of different
# queues bind in parallel and none waits behind a large pin


class Job:
    def __init__(self, work: Callable[[Job], None], undo: Callable[[], None]) -> None:
        self.work, self.undo = work, undo
        self.done = False
        self.error: BaseException | None = None
        self.cancelled = False  # work looks at it between steps
        self._child: int | None = None  # pidfd of a child process doing a step
        self._lock = threading.Lock()
        # held until the work is done: wait() acquires it (a bare lock: an Event's Condition would allocate a
        # lock of its own and take two more on every wait, on the loop's side of each grant)
        self._finished = threading.Lock()
        self._finished.acquire()
        self._waited = False  # the loop waits for it (wait()): it needs no wake-up when it is done

    def watch(self, pidfd: int | None) -> None:
        """A child process does a step (pidfd), or no longer (None): cancel() kills it meanwhile."""
        with self._lock:
            self._child = pidfd
            if pidfd is not None and self.cancelled:
                self._kill()

    def _kill(self) -> None:
        if self._child is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._child, signal.SIGKILL)

    def run(self) -> bool:
        """Do the work; True when the loop must be woken to see it done (nobody was waiting in wait())."""
        try:
            self.work(self)
        except BaseException as e:
            self.error = e
        with self._lock:
            self.done = True
            late = self.cancelled
            waited = self._waited
        self._finished.release()
        if late:
            self.undo()
        return not waited

    def wait(self, timeout: float) -> bool:
        """Wait up to timeout seconds for the work to be done (the GIL is released meanwhile); whether it is."""
        with self._lock:
            if self.done:
                return True
            self._waited = True
        if self._finished.acquire(timeout=timeout):
            self._finished.release()  # done for good: a later wait() must not block
        with self._lock:
            self._waited = False  # from now on, a job that ends wakes the loop
            return self.done

    def cancel(self) -> None:
        """Give up: undo now if the work is over, else when it is (a child doing a step is killed)."""
        with self._lock:
            self.cancelled = True
            over = self.done
            self._kill()
        if over:
            self.undo()


class Workers:
    def __init__(self, threads: int = THREADS, light: int = LIGHT_THREADS) -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._light: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.wake, self._wake_w = socket.socketpair()  # the loop selects on `wake`
        self.wake.setblocking(False)
        self._wake_w.setblocking(False)
        self._threads = [threading.Thread(target=self._run, args=(self._jobs,), name=f"xskbroker-worker-{i}",
                                          daemon=True) for i in range(threads)]
        self._threads += [threading.Thread(target=self._run, args=(self._light,), name=f"xskbroker-light-{i}",
                                           daemon=True) for i in range(light)]
        for t in self._threads:
            t.start()

    def submit(self, job: Job, heavy: bool = True) -> Job:
        (self._jobs if heavy else self._light).put(job)
        return job

    def _run(self, jobs: queue.SimpleQueue[Job | None]) -> None:
        # binds answer a client now; pinning a large UMEM takes seconds (and its child inherits the CPU)
        (cpus.serving if jobs is self._light else cpus.background)()
        while (job := jobs.get()) is not None:
            if job.run():
                with contextlib.suppress(OSError):  # full (the loop is behind: it will look anyway) or closed
                    self._wake_w.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.wake.recv(4096):
                pass

    def stop(self, wait: float = 0.5) -> None:
        """End the threads. One still pinning pages is not waited for past `wait`: it undoes its job
        itself when the syscall returns, or the process exit does."""
        for t in self._threads:
            (self._light if t.name.startswith("xskbroker-light") else self._jobs).put(None)
        deadline = time.monotonic() + wait
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.wake.close()
        self._wake_w.close()
