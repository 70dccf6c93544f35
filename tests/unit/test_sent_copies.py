"""broker/sent_copies.py: the broker's copies of sent fds, kept a moment, then closed by a helper process.

Each copy here is a pipe's write end: its read end sees end of file only once every copy is closed, whoever
held it (this process, a message in flight, the helper)."""

from __future__ import annotations

import os
import resource
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from xskbroker.broker.closer import Closer
from xskbroker.broker.sent_copies import HUNG_SECONDS, LOOK_EVERY, NOW_DELAY, SentCopies, parse


def wait_for(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def closed(r: int) -> bool:
    """Whether every copy of the pipe's write end is closed (its read end is at end of file)."""
    return bool(select.select([r], [], [], 0)[0]) and os.read(r, 1) == b""


def alive(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def copies() -> Iterator[SentCopies]:
    sc = SentCopies()
    reads: list[int] = []
    sc.reads = reads  # type: ignore[attr-defined]
    yield sc
    sc.stop()
    for r in reads:
        os.close(r)


def pipe(sc: SentCopies) -> tuple[int, int]:
    r, w = os.pipe()
    sc.reads.append(r)  # type: ignore[attr-defined]
    return r, w


def ready(sc: SentCopies) -> int:
    """Start the helper (the first copies go to the closer threads while it starts) and wait until it reads."""
    r, w = pipe(sc)
    sc.close([w])
    sc.flush()
    wait_for(lambda: closed(r), "the first copy to be closed")
    wait_for(sc.helper_ready, "the helper to read")
    pid = sc.helper_pid()
    assert pid is not None
    return pid


def unread_answers(sc: SentCopies) -> None:
    """A copy to close every 2 ms for a second, the helper's answers left unread; then every one closed."""
    pipes = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        pipes.append(pipe(sc))
        sc.close([pipes[-1][1]])
        sc.flush()
        time.sleep(0.002)
    wait_for(lambda: all(closed(r) for r, _ in pipes), "every copy to be closed")


def test_kept_copies_close_when_due_or_when_their_lease_ends(copies: SentCopies) -> None:
    ready(copies)
    (r1, w1), (r2, w2) = pipe(copies), pipe(copies)
    copies.close_later([w1], 0.3, "one")
    copies.close_later([w2], 0.3, "two")
    assert alive(w1) and alive(w2)  # queued until the loop hands them over
    t = time.monotonic()
    copies.flush()
    assert not alive(w1) and not alive(w2)  # ours closed at once: the helper keeps the copies
    assert copies.pending()
    copies.expedite("two")
    copies.flush()
    wait_for(lambda: closed(r2), "the expedited copy to be closed")
    assert not closed(r1) and copies.pending()
    wait_for(lambda: closed(r1), "the kept copy to be closed once due")
    assert time.monotonic() - t >= 0.3
    wait_for(lambda: not copies.pending(), "the helper to say it closed them")


def test_a_copy_to_close_now_is_held_a_moment_so_that_ours_is_never_the_last(copies: SentCopies) -> None:
    ready(copies)
    r, w = pipe(copies)
    copies.close([w])
    t = time.monotonic()
    copies.flush()
    assert not alive(w)
    wait_for(lambda: closed(r), "the copy to be closed")
    assert time.monotonic() - t >= NOW_DELAY


def test_the_helper_closes_the_copies_and_pending_knows_until_it_has(copies: SentCopies) -> None:
    pid = ready(copies)
    r, w = pipe(copies)
    os.kill(pid, signal.SIGSTOP)
    try:
        copies.close([w])
        copies.flush()
        assert not alive(w)  # the broker's copy is closed at once...
        time.sleep(0.05)
        assert not closed(r)  # ...the one in the message to the stopped helper is not
        assert copies.pending()  # a socket among them may still hold its queue
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: closed(r), "the helper to close it")
    wait_for(lambda: not copies.pending(), "the helper to say so")


def test_a_helper_that_stops_reading_never_blocks_the_loop_nor_keeps_the_copies(copies: SentCopies) -> None:
    pid = ready(copies)
    os.kill(pid, signal.SIGSTOP)
    pipes: list[tuple[int, int]] = []
    try:
        t = time.monotonic()
        # one message per round, until its queue is full (a few hundred here): the rest go to the closer threads
        while len(pipes) < 4000 and sum(closed(r) for r, _ in pipes[-16:]) < 8:
            pipes.append(pipe(copies))
            copies.close([pipes[-1][1]])
            copies.flush()
        assert time.monotonic() - t < 2.0
        assert sum(closed(r) for r, _ in pipes) >= 8, len(pipes)  # closed while the helper is stopped
        assert copies.pending()
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: all(closed(r) for r, _ in pipes), "every copy to be closed")
    wait_for(lambda: not copies.pending(), "nothing pending")


def test_a_helper_that_dies_takes_the_copies_it_held_and_the_threads_close_the_rest(copies: SentCopies) -> None:
    pid = ready(copies)
    (r1, w1), (r2, w2) = pipe(copies), pipe(copies)
    os.kill(pid, signal.SIGSTOP)
    copies.close([w1])
    copies.flush()  # in flight to a helper about to die
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: closed(r1), "the kernel to close what was queued to the dead helper")
    wait_for(lambda: not copies.pending(), "its copies to count as closed")
    copies.close([w2])
    copies.flush()
    wait_for(lambda: closed(r2), "the closer threads to close it")
    assert not copies.helper_ready()


def test_stop_closes_what_is_kept_and_ends_the_helper(copies: SentCopies) -> None:
    pid = ready(copies)
    r, w = pipe(copies)
    copies.close_later([w], 60.0, "kept")
    copies.stop()
    assert closed(r)
    assert copies.helper_pid() is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # exited and reaped


def test_without_a_helper_the_closer_threads_close_and_a_lease_end_still_closes_at_once(copies: SentCopies) -> None:
    sc = SentCopies(helper=False)
    try:
        r, w = os.pipe()
        sc.close_later([w], 60.0, "x")
        sc.flush()
        assert not closed(r)
        sc.expedite("x")
        wait_for(lambda: closed(r), "the threads to close it")
        assert sc.helper_pid() is None and not sc.helper_ready()
        os.close(r)
    finally:
        sc.stop()


def test_the_helper_reads_each_entry_and_closes_all_of_a_message_it_cannot_read() -> None:
    from xskbroker.broker.sent_copies import _header, _messages

    entries = [([3, 4], 0.005, "lease-a"), ([], 0.0, "lease-b"), ([5], 0.002, None)]
    (chunk,) = _messages(entries)
    assert parse(_header(chunk), [3, 4, 5]) == entries
    assert parse(_header(chunk), [3, 4]) == [([3], 0.0, None), ([4], 0.0, None)]  # fds that do not add up
    assert parse(b"", [7]) == [([7], 0.0, None)]
    big = _messages([(list(range(300)), 0.005, "k"), (list(range(300, 310)), 0.005, "m")])
    assert [sum(len(g) for g, _, _ in m) for m in big] == [250, 60]  # SCM_MAX_FD: cut, in order
    assert [g for m in big for g, _, _ in m] == [list(range(250)), list(range(250, 300)), list(range(300, 310))]


def voluntary_switches(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("voluntary_ctxt_switches:")[1].split()[0])


def test_an_idle_helper_sleeps_even_when_the_broker_has_not_read_its_answers(copies: SentCopies) -> None:
    """The broker reads the helper's answers only when it asks pending(): once its end is full, a helper that
    retried on a timer woke every 2 ms for as long as the broker stayed idle."""
    pid = ready(copies)
    unread_answers(copies)  # answers go at most every 2 ms: a few hundred fill the broker's end
    time.sleep(0.2)  # its closer threads are idle now
    before = voluntary_switches(pid)
    time.sleep(1.0)
    assert voluntary_switches(pid) - before < 20  # asleep, not retrying its answer every 2 ms
    wait_for(lambda: not copies.pending(), "the answers, once read, to say everything is closed")


def test_a_closer_counts_a_batch_before_it_stops_being_pending() -> None:
    """The helper reads pending() and then the count: a batch that had stopped being pending before it was
    counted was in neither, its count was never sent, and the broker's pending() stayed true (a run of the
    whole suite caught it: every copy closed, "nothing pending" never came)."""
    counted: list[int] = []

    def slow_count(n: int) -> None:
        time.sleep(0.05)
        counted.append(n)

    closer = Closer(2, name="t", on_closed=slow_count)
    r, w = os.pipe()
    try:
        closer.close([w])
        wait_for(lambda: not closer.pending(), "the batch to be closed")
        assert counted == [1]
    finally:
        closer.stop()
        os.close(r)


def test_a_closer_grows_a_thread_for_each_close_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each close of a bound socket holds its thread for a grace period: with every thread busy, each batch
    starts one more (up to the cap). A thread started for a batch counted itself idle when it took that
    batch, so the next batch found a thread idle that was not, waited behind a grace period, and only every
    other close of a burst got a thread."""
    import xskbroker.broker.closer as closer_mod

    gate = threading.Event()
    held: list[int] = []
    mu = threading.Lock()
    real_close = os.close

    class HeldOs:
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        @staticmethod
        def close(fd: int) -> None:  # a bound socket's last close: it waits (here, for the test)
            with mu:
                held.append(fd)
            gate.wait(10)
            real_close(fd)

    monkeypatch.setattr(closer_mod, "os", HeldOs())
    closer = Closer(16, name="t")
    pipes = [os.pipe() for _ in range(8)]
    try:
        wait_for(lambda: closer._idle == 1, "the first thread to wait for work")
        for _, w in pipes:
            closer.close([w])
        deadline = time.monotonic() + 5.0
        while len(held) < len(pipes) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(held) == len(pipes), f"{len(held)} of {len(pipes)} closes in flight on {closer.threads} threads"
    finally:
        gate.set()
        closer.stop()
        for r, _ in pipes:
            os.close(r)


def test_a_closer_stopped_as_a_kept_batch_comes_due_still_closes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread that keeps close_later's fds takes a due batch, then queues it for the closer threads outside
    the lock: a stop() in between queued the threads' ends first, the threads ended, and the batch stayed open
    after stop(wait=True) had returned."""
    closer = Closer(4, name="t")
    taken = threading.Event()
    real_close = closer.close

    def slow_close(fds: list[int]) -> None:
        if threading.current_thread() is closer._later_thread:
            taken.set()
            time.sleep(0.2)  # the stop comes meanwhile
        real_close(fds)

    monkeypatch.setattr(closer, "close", slow_close)
    r, w = os.pipe()
    try:
        closer.close_later([w], 0.01)
        assert taken.wait(5)
        closer.stop(wait=True)
        wait_for(lambda: closed(r), "the kept fd to be closed")
    finally:
        os.close(r)


def test_copies_the_helper_had_no_room_for_are_closed_and_counted_so(copies: SentCopies) -> None:
    """A message whose fds do not all fit the helper's RLIMIT_NOFILE is cut short (MSG_CTRUNC): the kernel closes
    the rest. Those count as closed too, or pending() said for good that sockets may still hold their queues."""
    pid = ready(copies)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (max(used) + 2, hard))  # a few free numbers at most
    try:
        pipes = [pipe(copies) for _ in range(40)]
        copies.close([w for _, w in pipes])
        copies.flush()
        wait_for(lambda: all(closed(r) for r, _ in pipes), "every copy to be closed, by the helper or the kernel")
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    wait_for(lambda: not copies.pending(), "pending() to know they are closed")
    assert copies.helper_pid() == pid and copies.helper_ready()


def test_a_kept_batch_on_its_way_to_the_closer_threads_is_still_pending(monkeypatch: pytest.MonkeyPatch) -> None:
    """Taken from the kept ones (due, or its lease ended) and not yet queued for the threads, a batch was neither kept
    nor in flight: pending() said nothing was left while its fds were open."""
    closer = Closer(4, name="t")
    taken, go = threading.Event(), threading.Event()
    real_close = closer.close

    def slow_close(fds: list[int]) -> None:
        if threading.current_thread() is not threading.main_thread():
            taken.set()
            go.wait(5)
        real_close(fds)

    monkeypatch.setattr(closer, "close", slow_close)
    (r1, w1), (r2, w2) = os.pipe(), os.pipe()
    try:
        closer.close_later([w1], 0.01)
        assert taken.wait(5)
        assert closer.pending() and alive(w1), "a due batch on its way to the threads was not pending"
        go.set()
        wait_for(lambda: closed(r1), "the kept fd to be closed")
        wait_for(lambda: not closer.pending(), "nothing pending")
        monkeypatch.setattr(closer, "close", real_close)
        closer.close_later([w2], 60.0, "lease")
        closer.expedite("lease")
        wait_for(lambda: closed(r2), "the expedited fd to be closed")
        wait_for(lambda: not closer.pending(), "nothing pending")
    finally:
        go.set()
        closer.stop()
        os.close(r1)
        os.close(r2)


def watching(sc: SentCopies, check: Callable[[], bool], what: str, timeout: float) -> float:
    """Call watch() as the loop does, when it asks, until check(); how long that took."""
    t = time.monotonic()
    while not check():
        if time.monotonic() - t > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        wait = sc.watch()
        time.sleep(min(wait if wait is not None else 0.05, 0.05))
    return time.monotonic() - t


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_helper_that_hangs_is_killed_and_its_death_closes_the_copies_it_held() -> None:
    """A stopped (or stuck) helper kept what it was sent open until it went on: a released socket's queue stayed
    busy, and pending() true, for as long as it was stopped. Once its count stays short of what was due
    HUNG_SECONDS ago, it is killed; the closer threads close what comes after."""
    hung: list[int] = []
    sc = SentCopies(on_hung=hung.append)
    sc.reads = []  # type: ignore[attr-defined]
    r = r2 = -1
    try:
        pid = ready(sc)
        r, w = os.pipe()
        os.kill(pid, signal.SIGSTOP)
        sc.close([w])
        sc.flush()  # in the stopped helper's queue
        took = watching(sc, lambda: closed(r), "the hung helper's copy to be closed", HUNG_SECONDS + 4 * LOOK_EVERY + 3)
        assert took >= HUNG_SECONDS - 0.1, f"killed after {took:.2f} s: not hung for {HUNG_SECONDS} s yet"
        assert sc.given_up and hung == [pid]
        wait_for(lambda: gone(pid), "the helper gone")
        wait_for(lambda: not sc.pending(), "pending() to know its copies are closed")
        assert sc.helper_pid() is None and not sc.helper_ready()
        r2, w2 = os.pipe()
        sc.close([w2])
        sc.flush()
        wait_for(lambda: closed(r2), "the closer threads to close it")
        assert sc.watch() is None
    finally:
        sc.stop()
        for fd in (r, r2, *sc.reads):  # type: ignore[attr-defined]
            if fd >= 0:
                os.close(fd)


def test_a_helper_that_keeps_copies_not_due_yet_or_whose_answers_were_not_read_is_not_taken_for_hung(
        copies: SentCopies) -> None:
    """Only fds due HUNG_SECONDS ago count: copies kept for longer (until their lease ends) do not, nor does a count
    that the broker's full end held back (it reads the answers only when it asks, so they pile up)."""
    pid = ready(copies)
    r, w = pipe(copies)
    copies.close_later([w], 60.0, "kept")
    unread_answers(copies)  # answers every 2 ms, none read: the broker's end fills
    time.sleep(HUNG_SECONDS)  # every one due long ago; what the broker has read of the count says far fewer
    t = time.monotonic()
    while time.monotonic() - t < 4 * LOOK_EVERY:
        copies.watch()
        time.sleep(LOOK_EVERY / 5)
    assert not copies.given_up and copies.helper_pid() == pid and not closed(r)
    assert copies.pending()  # the one kept
    copies.expedite("kept")
    copies.flush()
    wait_for(lambda: closed(r), "the kept copy, its lease ended")
    wait_for(lambda: not copies.pending(), "nothing pending")
    assert copies.watch() is None  # nothing outstanding: the loop need not wake for it
