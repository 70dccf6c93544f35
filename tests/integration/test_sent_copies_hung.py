"""The broker's closing helper (broker.sent_copies) hung, on the real kernel: a real helper process stopped with
SIGSTOP holds the copies of a released lease's sockets, whose queue stays busy until the broker gives it up."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xskbroker.broker.sent_copies import HUNG_SECONDS, LOOK_EVERY
from xskbroker.client.connection import Connection
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, child_pids
from xskbroker.wire import protocol as proto
from xskbroker.wire.errors import ErrorCode

from .conftest import ns_name, wait_for
from .grant_bed import TESTS_POLICY, grant_release

G = proto.Geometry(umem_size=1 << 20, fill=256, completion=256, rx=256, tx=256)


@pytest.fixture
def bed() -> Iterator[tuple[VethNamespace, BrokerProcess]]:
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2) as ns, \
            BrokerProcess(ns.name, TESTS_POLICY) as b:
        yield ns, b


def _closing_helper(b: BrokerProcess) -> int | None:
    for p in child_pids(b.pid):
        with contextlib.suppress(FileNotFoundError):
            if b"xskbroker.broker.sent_copies" in Path(f"/proc/{p}/cmdline").read_bytes():
                return p
    return None


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_closing_helper_that_hangs_is_given_up_and_a_released_queue_is_granted_again(bed: Any) -> None:
    """Stopped, the helper kept the copies of a released lease's socket open: every grant of its queue was refused
    (queue busy) for as long as it stayed stopped. Now it is killed once it is HUNG_SECONDS behind, and its exit
    closes them."""
    _, b = bed
    for _ in range(3):  # the first copies go to the broker's threads while the helper starts
        grant_release(b, G)
    wait_for(lambda: _closing_helper(b) is not None, what="the closing helper started")
    helper = _closing_helper(b)
    assert helper is not None
    # its closer's first thread is started just before it first answers (that it reads)
    wait_for(lambda: len(os.listdir(f"/proc/{helper}/task")) >= 2, what="the closing helper up")
    time.sleep(0.2)  # its first answer sent
    grant_release(b, G, 0)  # the broker has read that answer: copies go to the helper from now on
    os.kill(helper, signal.SIGSTOP)
    try:
        released = time.monotonic()
        grant_release(b, G)  # the broker's copies of its socket wait in the stopped helper's queue
        refused = 0
        bound = HUNG_SECONDS + 2 * LOOK_EVERY + 5.0  # then the helper's exit closes them (a grace period)
        while True:
            try:
                grant_release(b, G)
                break
            except proto.BrokerError as e:
                assert e.code in (ErrorCode.QUEUE_BUSY, ErrorCode.QUEUE_SQUATTED), e
                refused += 1
                if time.monotonic() - released > bound:
                    raise AssertionError(f"queue 1 still busy {bound:.1f} s after its lease ended, behind a "
                                         f"stopped closing helper ({refused} grants refused)") from None
        took = time.monotonic() - released
        assert refused, "the queue was never busy: the copies did not go to the stopped helper"
        wait_for(lambda: _gone(helper), what="the hung helper gone")
        hung = [r for r in b.records() if r.get("event") == "closing-helper-hung"]
        assert [r["helper_pid"] for r in hung] == [helper], hung
        with Connection(b.socket_path) as c:  # and the broker goes on, its threads closing the copies
            assert c.call(proto.Hello())[0]
        for _ in range(3):
            grant_release(b, G)
        print(f"queue granted again {took:.2f} s after its release ({refused} refused meanwhile)")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGCONT)
