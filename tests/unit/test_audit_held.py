"""broker.audit.Held: the server holds a round's records until its replies are out, then writes them in order."""

from __future__ import annotations

from typing import Any

from xskbroker.broker.audit import Held, Throttle


def test_grant_and_release_records_wait_for_the_round_and_come_out_in_order() -> None:
    out: list[dict[str, Any]] = []
    held = Held(out.append)
    held({"event": "grant", "n": 1})
    assert out == [{"event": "grant", "n": 1}]  # not held: straight through
    held.hold()
    held({"event": "grant", "n": 2})
    held.hold()  # a second hold in the same round keeps what the first held
    held({"event": "release", "n": 3})
    assert len(out) == 1
    held.release()
    assert [r["n"] for r in out] == [1, 2, 3]
    held({"event": "grant", "n": 4})  # released: straight through again
    assert out[-1]["n"] == 4
    held.release()  # nothing held: nothing written twice
    assert len(out) == 4


def test_any_other_record_is_written_at_once_after_what_was_held() -> None:
    # an internal error or a program attached is what a broker that dies next should have said
    out: list[dict[str, Any]] = []
    held = Held(out.append)
    held.hold()
    held({"event": "grant", "n": 1})
    held({"event": "internal-error", "n": 2})
    assert [r["n"] for r in out] == [1, 2]
    held({"event": "release", "n": 3})
    assert len(out) == 2
    held.release()
    assert [r["n"] for r in out] == [1, 2, 3]


def test_flush_writes_what_is_held_then_the_throttles_summary() -> None:
    out: list[dict[str, Any]] = []
    now = [0.0]
    held = Held(Throttle(out.append, clock=lambda: now[0], burst=1, window=10.0))
    for _ in range(3):
        held({"event": "bad-request", "peer": {"uid": 7}, "code": "bad-json"})
    assert [r["event"] for r in out] == ["bad-request"] and held.next_flush() == 10.0
    held.hold()
    held({"event": "grant"})
    held.flush()  # what is held, then the summary
    assert [r["event"] for r in out] == ["bad-request", "grant", "suppressed"]
    assert out[2]["counts"] == {"bad-request": 2}
    now[0] = 20.0
    held.flush_if_due()  # a new window, nothing left out in it: no summary
    assert len(out) == 3 and held.next_flush() is None
