"""The benchmarks' failure paths and fairness: a run whose work failed gives no figure (never a "met"), and the
series compared in one ratio are sampled alike."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench import grant_latency, throughput
from bench.__main__ import _rows


class _FakeConnection:
    """A connection whose hellos answer at once."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> _FakeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def call(self, msg: object) -> tuple[dict[str, Any], list[int]]:
        return {}, []


def test_a_failed_1gib_grant_is_no_figure_not_a_met(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.2)  # long enough for some hellos to be timed against an idle broker
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(throughput, "Connection", _FakeConnection)
    monkeypatch.setattr(throughput, "request_fds", refused)
    monkeypatch.setattr(throughput, "HELLO_EVERY", 0.001)
    with pytest.raises(RuntimeError, match="1 GiB grant"):
        result = throughput.hello_during_big_grant("/nonexistent", 0, grants=1)
        # what the unfixed code did with it: a table row saying the goal was met
        row = next(r for r in _rows({"throughput": {"hello_during_1gib_grant": result}}) if "1 GiB" in r[0])
        pytest.fail(f"a failed 1 GiB grant gave a figure: {row}")


def test_every_series_of_grant_latency_follows_the_same_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each timed sample (new connection, kept connection, direct) starts after the same idle pause: a direct
    sample run straight after another's work, or one whose own close work (its UMEM unpinned by a kworker)
    lands in the next series' sample, would tilt the ratio."""
    events: list[str] = []

    class Sock:
        def close(self) -> None:
            events.append("close")

    def fake_request(*args: Any, connection: Any = None, **kwargs: Any) -> tuple[dict[str, Any], list[int]]:
        events.append("kept" if connection is not None else "new")
        return {}, []

    def fake_create(*args: Any) -> Sock:
        events.append("direct")
        return Sock()

    @contextlib.contextmanager
    def no_netns(name: str) -> Iterator[None]:
        yield

    class B:
        class broker:
            socket_path = "/nonexistent"
            pid = 1

        class ns:
            name = "x"

        class program:
            map_fd = -1

        ifindex = 1

    monkeypatch.setattr(grant_latency, "request_fds", fake_request)
    monkeypatch.setattr(grant_latency.xsk, "create_bound", fake_create)
    monkeypatch.setattr(grant_latency, "in_netns", no_netns)
    monkeypatch.setattr(grant_latency, "_waited_ms", lambda pid: 0.0)
    monkeypatch.setattr(grant_latency.time, "sleep", lambda s: events.append(f"pause {s:.3f}"))
    brokered: list[float] = []
    kept: list[float] = []
    direct: list[float] = []
    waits: dict[str, list[float]] = {"new": [], "kept": []}
    grant_latency._sample(B(), object(), grant_latency.Geometry(umem_size=4 << 20), 4, 3, 32,  # type: ignore[arg-type]
                          brokered, kept, direct, waits)
    assert len(brokered) == len(kept) == len(direct) == 3
    timed = [i for i, e in enumerate(events) if e in ("new", "kept", "direct")]
    assert [events[i] for i in timed[:3]] == ["new", "kept", "direct"]
    pause = f"pause {grant_latency.PAUSE + 4 * grant_latency.PAUSE_PER_MIB:.3f}"
    for i in timed[1:]:  # every sample but the very first (a warm-up) comes after the others' pause
        assert events[i - 1] == pause, f"{events[i]} sample #{timed.index(i)} after {events[i - 1]!r}, not a pause"


def test_the_c_reference_runs_among_the_library_runs_and_as_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/datapath.py: the C consumer's runs are interleaved with the library's (one per couple of pairs),
    each as long as a library run, and the library-over-C figure compares runs of the same stretch of time."""
    from bench import datapath

    events: list[str] = []
    clock = iter(range(10_000))

    class Sock:
        def __init__(self, label: str) -> None:
            self.label = label

        def close(self) -> None:
            pass

    monkeypatch.setattr(datapath, "_socket", lambda b, label: Sock(label))
    monkeypatch.setattr(datapath.time, "sleep", lambda s: None)
    argv: list[list[str]] = []

    class Done:
        returncode = 0
        stdout = '{"pps": 100.0}'
        stderr = ""

    def fake_run(cmd: list[str], **kwargs: Any) -> Done:
        argv.append(cmd)
        return Done()

    @contextlib.contextmanager
    def no_netns(name: str) -> Iterator[None]:
        yield

    monkeypatch.setattr(datapath.subprocess, "run", fake_run)
    monkeypatch.setattr(datapath, "in_netns", no_netns)

    class B:
        class program:
            map_fd = 7

        class ns:
            name = "x"
            inside = "xsk0"

    def measure(xs: Any) -> float:
        t = next(clock)
        events.append(xs.label)
        return 200.0 * (1 + 0.02 * t)  # a machine speeding up: only interleaving keeps the ratio

    def c_run() -> float:
        t = next(clock)
        events.append("c")
        return datapath._c_rate(B(), "rx", b"\0" * 64) * (1 + 0.02 * t)  # type: ignore[arg-type]

    out = datapath._compare(B(), measure, 1.0, c_run)  # type: ignore[arg-type]
    assert argv and all(cmd[5] == str(datapath.RUN_SECONDS) for cmd in argv)
    first_c, last_c = events.index("c"), len(events) - 1 - events[::-1].index("c")
    library = [i for i, e in enumerate(events) if e != "c"]
    assert first_c < library[len(library) // 4] and last_c > library[3 * len(library) // 4]
    assert events.count("c") == datapath.PAIRS // 2
    # each C run set against the brokered runs around it: the drift cancels, near the true 200/100
    assert out["library_over_c"] == pytest.approx(2.0, rel=0.05)


def test_cold_start_fails_when_the_socket_activator_dies(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """bench/cold_start.py: systemd-socket-activate missing or failing is an error, not a wait for ever."""
    import threading

    from bench import cold_start

    class Dead:
        returncode = 1

        def poll(self) -> int:
            return 1

        def terminate(self) -> None:
            pass

        def wait(self) -> int:
            return 1

    @contextlib.contextmanager
    def no_ns(*args: Any, **kwargs: Any) -> Iterator[Any]:
        class NS:
            name = "x"

        yield NS()

    monkeypatch.setattr(cold_start, "VethNamespace", no_ns)
    monkeypatch.setattr(cold_start.subprocess, "Popen", lambda *a, **k: Dead())
    raised: list[BaseException] = []

    def go() -> None:
        try:
            cold_start._activated_first_grant(str(tmp_path), 1)
        except BaseException as e:  # what the test looks at
            raised.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "still waiting for a socket a dead systemd-socket-activate will never make"
    assert raised and isinstance(raised[0], RuntimeError)
