"""Kernel work too slow for the event loop: registering a large UMEM pins every page (3 s for 1 GiB here).

A few threads run such jobs (the syscalls release the GIL) while the loop keeps serving; a finished job
writes a byte to a socketpair the loop watches, and the loop completes the request there, so leases and
quotas stay single-threaded. A job the broker gives up on (it is stopping) is undone by whoever sees
it last: the loop if the job had finished, else the worker once its step ends (a child process pinning
pages is killed, which ends it at once). A broker that exits meanwhile loses nothing either: its fds
close, which unpins the pages and empties the slots, and a child dies with the thread that forked it.
"""

from __future__ import annotations

import collections
import contextlib
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


class _Slot:
    """One thread's place: asleep on a lock of its own until a job is put in it (None: stop)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.job: Job | None = None


class _Pool:
    """Threads of one kind. A job wakes exactly one idle thread, the last to go idle (its stack and caches
    the warmest). A queue all the threads waited on woke two per job: CPython's SimpleQueue.get hands its lock
    on after taking an item, so a second thread woke, took the GIL, found nothing and slept again, on the
    loop's CPU in the middle of the grant.

    One thread is started with the pool, the others as jobs overlap, up to `threads`: each start waits for the
    thread to run (~0.4 ms), which all of them started up front cost every socket-activated first grant."""

    def __init__(self, name: str, threads: int, pin: Callable[[], None], wake: Callable[[bool], None]) -> None:
        self._mu = threading.Lock()
        self._backlog: collections.deque[Job] = collections.deque()
        self._stopping = False
        self._pin, self._wake = pin, wake
        self._name, self._max = name, threads
        self._starting = 0  # threads started, or being started by submit()
        self._idle: list[_Slot] = []
        self.threads: list[threading.Thread] = []
        if threads:
            self._starting = 1
            self._add(None)  # one from the start: a job always has a thread to run it, whatever the system allows

    def submit(self, job: Job) -> None:
        with self._mu:
            if self._idle:
                slot = self._idle.pop()
                slot.job = job
            elif not self._stopping and self._starting < self._max:
                self._starting += 1
                slot = None
            else:
                self._backlog.append(job)
                return
        if slot is not None:
            slot.lock.release()
        elif not self._add(job):  # no thread to be had (a task limit): the job goes to a running one
            with self._mu:
                self._starting -= 1
                slot = self._idle.pop() if self._idle else None  # one gone idle meanwhile, or the next one done
                if slot is None:
                    self._backlog.append(job)
                else:
                    slot.job = job
            if slot is not None:
                slot.lock.release()

    def _add(self, job: Job | None) -> bool:
        """Start a thread, with its first job or (None) idle; False where the system gives no thread."""
        slot = _Slot()
        t = threading.Thread(target=self._run, args=(slot,), name=f"{self._name}-{len(self.threads)}", daemon=True)
        if job is None:
            with self._mu:
                self._idle.append(slot)
        else:
            slot.job = job
            slot.lock.release()
        try:
            t.start()
        except RuntimeError:
            if job is None:  # the pool's first: a broker that cannot start one thread cannot serve
                raise
            return False
        self.threads.append(t)
        return True

    def _run(self, slot: _Slot) -> None:
        self._pin()
        while True:
            slot.lock.acquire()
            job = slot.job
            while job is not None:
                self._wake(job.run())
                with self._mu:
                    if self._backlog:
                        job = self._backlog.popleft()
                        continue
                    job = slot.job = None
                    if self._stopping:
                        return
                    self._idle.append(slot)
            if self._stopping:
                return

    def stop(self) -> None:
        """Idle threads end now; busy ones when the jobs already submitted are done."""
        with self._mu:
            self._stopping = True
            idle, self._idle = self._idle, []
        for slot in idle:
            slot.job = None
            slot.lock.release()


class Workers:
    def __init__(self, threads: int = THREADS, light: int = LIGHT_THREADS) -> None:
        self.wake, self._wake_w = socket.socketpair()  # the loop selects on `wake`
        self.wake.setblocking(False)
        self._wake_w.setblocking(False)
        # binds answer a client now; pinning a large UMEM takes seconds (and its child inherits the CPU)
        self._heavy = _Pool("xskbroker-worker", threads, cpus.background, self._woken)
        self._light = _Pool("xskbroker-light", light, cpus.serving, self._woken)

    @property
    def _threads(self) -> list[threading.Thread]:
        """The threads started so far."""
        return self._heavy.threads + self._light.threads

    def submit(self, job: Job, heavy: bool = True) -> Job:
        (self._heavy if heavy else self._light).submit(job)
        return job

    def _woken(self, needed: bool) -> None:
        """A job is done: wake the loop, unless it was waiting for the job itself (Job.run says which)."""
        if needed:
            with contextlib.suppress(OSError):  # full (the loop is behind: it will look anyway) or closed
                self._wake_w.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.wake.recv(4096):
                pass

    def stop(self, wait: float = 0.5) -> None:
        """End the threads. One still pinning pages is not waited for past `wait`: it undoes its job
        itself when the syscall returns, or the process exit does."""
        self._heavy.stop()
        self._light.stop()
        deadline = time.monotonic() + wait
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.wake.close()
        self._wake_w.close()
