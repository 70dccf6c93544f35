"""The root probe the hostile-client suites run while an attack is under way: a hello round trip on a new
connection, then a real 1 MiB bound grant and its release, each timed. The broker must answer both within
PROBE_LIMIT during every attack; the figures (p50 and max) go to the suite summary."""

from __future__ import annotations

import time

from xskbroker.client.connection import Connection
from xskbroker.client.grant import request
from xskbroker.wire import protocol as proto

PROBE_LIMIT = 2.0  # seconds
MiB = 1 << 20


class RootProbe:
    def __init__(self, path: str, iface: str = "xsk0", queue: int = 1) -> None:
        self.path, self.iface, self.queue = path, iface, queue
        self.hello: list[float] = []
        self.grant: list[float] = []

    def run(self, rounds: int = 3, pause: float = 0.0) -> RootProbe:
        for _ in range(rounds):
            started = time.perf_counter()
            with Connection(self.path, PROBE_LIMIT) as c:
                assert c.call(proto.Hello())[0]["ok"]
            self.hello.append(time.perf_counter() - started)
            started = time.perf_counter()
            with request(self.iface, [self.queue], geometry=proto.Geometry(umem_size=MiB), socket_path=self.path,
                         timeout=PROBE_LIMIT):
                pass
            self.grant.append(time.perf_counter() - started)
            assert self.hello[-1] < PROBE_LIMIT and self.grant[-1] < PROBE_LIMIT, (self.hello[-1], self.grant[-1])
            time.sleep(pause)
        return self

    def figures(self) -> dict[str, float]:
        out = {}
        for name, values in (("hello", self.hello), ("grant_release", self.grant)):
            ordered = sorted(values)
            out[f"probe_{name}_p50_ms"] = round(ordered[len(ordered) // 2] * 1000, 2)
            out[f"probe_{name}_max_ms"] = round(ordered[-1] * 1000, 2)
        return out
