"""The worker threads that make large grants: completions wake the loop, and a cancelled job is undone
exactly once, by the loop or by the worker, whichever sees it last."""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable

from xskbroker.broker.workers import Job, Workers


def _woken(w: Workers, timeout: float = 5.0) -> bool:
    ready = bool(select.select([w.wake], [], [], timeout)[0])
    w.drain()
    return ready


def test_a_finished_job_wakes_the_loop_with_its_result() -> None:
    w = Workers(threads=2)
    try:
        ok = w.submit(Job(lambda job: None, lambda: None))
        bad = w.submit(Job(lambda job: (_ for _ in ()).throw(OSError(12, "no memory")), lambda: None))
        deadline = time.monotonic() + 5
        while not (ok.done and bad.done) and time.monotonic() < deadline:
            _woken(w, 0.5)
        assert ok.done and ok.error is None
        assert bad.done and isinstance(bad.error, OSError) and bad.error.errno == 12
    finally:
        w.stop()


def test_a_job_cancelled_while_running_is_undone_by_the_worker_once() -> None:
    w = Workers(threads=1)
    undone: list[str] = []
    started, release = threading.Event(), threading.Event()

    def work(job: Job) -> None:
        started.set()
        release.wait(5)

    try:
        job = w.submit(Job(work, lambda: undone.append(threading.current_thread().name)))
        assert started.wait(5)
        job.cancel()
        assert undone == []  # still running: the worker undoes it when its step ends
        release.set()
        assert _woken(w)
        assert undone == ["xskbroker-worker-0"]
    finally:
        w.stop()


def test_a_job_cancelled_after_it_finished_is_undone_by_the_caller_once() -> None:
    w = Workers(threads=1)
    undone: list[int] = []
    try:
        job = w.submit(Job(lambda job: None, lambda: undone.append(1)))
        assert _woken(w) and job.done
        job.cancel()
        assert undone == [1]
    finally:
        w.stop()


def test_cancel_kills_the_child_process_a_job_is_waiting_for() -> None:
    w = Workers(threads=1)

    def work(job: Job) -> None:  # what broker.xsk.register_umem_apart does around its child
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        pidfd = os.pidfd_open(pid)
        job.watch(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
        finally:
            job.watch(None)
            os.close(pidfd)
        raise OSError(0, f"child ended with {os.waitstatus_to_exitcode(status)}")

    try:
        job = w.submit(Job(work, lambda: None))
        time.sleep(0.2)
        started = time.monotonic()
        job.cancel()
        assert _woken(w) and job.done
        assert time.monotonic() - started < 2
        assert str(job.error) == f"[Errno 0] child ended with {-signal.SIGKILL}"
    finally:
        w.stop()


def _switches(t: threading.Thread) -> int:
    with open(f"/proc/self/task/{t.native_id}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches:"))


def _overlap(w: Workers, n: int) -> list[Job]:
    """n light jobs running at once (each waits for the others), all done when this returns."""
    barrier = threading.Barrier(n, timeout=5)
    jobs = [w.submit(Job(lambda job: barrier.wait(), lambda: None), heavy=False) for _ in range(n)]
    assert all(j.wait(5) for j in jobs) and not any(j.error for j in jobs)
    return jobs


def _light(w: Workers) -> list[str]:
    return sorted(t.name for t in w._threads if t.name.startswith("xskbroker-light"))


def test_a_pool_starts_one_thread_and_grows_only_as_its_jobs_overlap() -> None:
    """Each thread start waits for the thread to run: a socket-activated broker that started all twelve before
    its first grant paid ~6 ms of its cold start for them. One of each kind is started at once."""
    w = Workers(threads=2, light=4)
    try:
        assert _light(w) == ["xskbroker-light-0"]
        assert [t.name for t in w._threads if t.name.startswith("xskbroker-worker")] == ["xskbroker-worker-0"]
        for _ in range(3):  # one after another: the one thread does them all
            assert w.submit(Job(lambda job: None, lambda: None), heavy=False).wait(5)
        assert _light(w) == ["xskbroker-light-0"]
        _overlap(w, 3)
        assert _light(w) == ["xskbroker-light-0", "xskbroker-light-1", "xskbroker-light-2"]
        release = threading.Event()
        jobs = [w.submit(Job(lambda job: release.wait(5), lambda: None), heavy=False) for _ in range(6)]
        time.sleep(0.1)
        assert len(_light(w)) == 4  # never more than the pool's size: the other two wait their turn
        release.set()
        assert all(j.wait(5) for j in jobs)
    finally:
        w.stop()
    assert not any(t.is_alive() for t in w._threads)


def test_a_job_whose_thread_cannot_be_started_runs_on_a_running_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A system out of tasks (RLIMIT_NPROC, pids.max) refuses a new thread: the job waits for the pool's running
    thread instead of being lost (a grant that never ends, its slots claimed)."""
    w = Workers(threads=1, light=2)
    try:
        def refused(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", refused)
        release = threading.Event()
        first = w.submit(Job(lambda job: release.wait(5), lambda: None), heavy=False)
        second = w.submit(Job(lambda job: None, lambda: None), heavy=False)
        assert not second.wait(0.1)  # behind the first: its own thread could not be started
        release.set()
        assert first.wait(5) and second.wait(5)
        assert _light(w) == ["xskbroker-light-0"]
    finally:
        monkeypatch.undo()
        w.stop()


def test_a_job_wakes_one_thread_alone() -> None:
    """Each wake-up of an idle thread is a voluntary context switch back from its sleep: jobs one after another
    wake the one thread that runs them, never another that then finds nothing to do (a SimpleQueue all the
    threads waited on woke a second thread per job, on the loop's CPU)."""
    w = Workers(threads=1, light=4)
    try:
        _overlap(w, 4)  # all four started (a pool grows as its jobs overlap)
        light = [t for t in w._threads if t.name.startswith("xskbroker-light")]
        assert len(light) == 4
        time.sleep(0.2)  # every thread asleep on its lock
        before = [_switches(t) for t in light]
        for _ in range(5):
            job = w.submit(Job(lambda job: None, lambda: None), heavy=False)
            assert job.wait(5)
            time.sleep(0.02)  # time for any other thread woken to go back to sleep
        woken = [t.name for t, n in zip(light, before, strict=True) if _switches(t) != n]
        assert len(woken) == 1, woken  # the one that went idle last, each time
    finally:
        w.stop()


def test_jobs_beyond_the_idle_threads_wait_their_turn_and_stop_ends_every_thread() -> None:
    w = Workers(threads=1, light=2)
    release = threading.Event()
    ran: list[int] = []

    def work(i: int) -> Callable[[Job], None]:
        def run(job: Job) -> None:
            release.wait(5)
            ran.append(i)
        return run

    jobs = [w.submit(Job(work(i), lambda: None), heavy=False) for i in range(5)]
    time.sleep(0.1)
    assert ran == []  # two running, three waiting
    release.set()
    assert all(j.wait(5) for j in jobs) and sorted(ran) == [0, 1, 2, 3, 4]
    w.stop()
    assert not any(t.is_alive() for t in w._threads)
