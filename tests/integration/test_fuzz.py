"""Robustness suite against a live broker: protocol fuzzing.

Each test makes its own namespace and broker, bounds its time, checks afterwards that the broker's open fds
are back at their baseline, and records its counts with the `figures` fixture (printed in the closing
summary). Every client runs in a child that dropped to an unprivileged uid before it connected.

XSKBROKER_FUZZ_EXAMPLES=<n> fuzzes n messages instead of the default 10,000 (a longer mode), and
XSKBROKER_FUZZ_SEED=<seed> replays the messages of an earlier run (its seed is among the figures).

What it sends is generated in fuzz_messages.py; the helpers it shares with the load and abuse suites are in
robustness.py.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st

from xskbroker.broker.umem_pool import MAX_PER_GEOMETRY
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace, spawn_unprivileged
from xskbroker.wire import protocol as proto

from .conftest import CONSUMER_UID, ns_name, wait_for
from .fuzz_messages import MESSAGES
from .robustness import (
    REPLY_TIMEOUT,
    UMEM_POOL,
    alive,
    assert_fds_back,
    census,
    close_all,
    connect,
    grant_cycles,
    ms,
    rss_kib,
    running,
    status,
)

MiB = 1 << 20
DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


# ---- 1. protocol fuzzing --------------------------------------------------------------------------------

FUZZ_MESSAGES = int(os.environ.get("XSKBROKER_FUZZ_EXAMPLES", "10000"))
FUZZ_SEED = int(os.environ.get("XSKBROKER_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
FUZZ_BATCH = 25  # messages per hypothesis example, all on the current connection

FUZZ_POLICY = f"""\
version = 1

[[allow]]
name = "fuzz"
users = [{CONSUMER_UID}]
interfaces = ["xsk0"]
queues = ["0-7"]
kinds = ["bound", "bare"]
max_queues = 2
max_umem = "2MiB"

[[allow]]
name = "fuzz-map"
users = [{CONSUMER_UID}]
interfaces = ["xsk1"]
kinds = ["map"]
exclusive = true

[[deny]]
name = "never-the-peer"
users = ["*"]
interfaces = ["*p"]
"""



class FuzzFailure(AssertionError):
    pass


class FuzzClient:
    """Sends fuzzed messages on one connection (a new one when the broker closes it) and checks each reply."""

    def __init__(self, path: str, documented: str) -> None:
        self.path = path
        self.documented = documented
        self.sock: socket.socket | None = None
        self.null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.counts: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[str] = collections.Counter()
        # the UMEM size of every bound grant the broker could decode, whatever its answer: the broker takes a
        # socket from its UMEM pool (which then learns that geometry) before the bind, and the bind may still
        # fail (a queue the kernel has not freed yet) or the connection close before the reply is read
        self.asked_sizes: set[int] = set()
        self.slowest = 0.0
        self.held: tuple[str, list[int]] | None = None  # one granted lease kept open until the batch ends

    def close(self) -> None:
        if self.held:
            close_all(self.held[1])
        self._drop()
        os.close(self.null)

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _conn(self) -> socket.socket:
        if self.sock is None:
            self.sock = connect(self.path)
            self.counts["connections"] += 1
        return self.sock

    def fail(self, why: str, payload: bytes, reply: Any = None) -> FuzzFailure:
        shown = payload if len(payload) <= 600 else payload[:300] + b"..." + payload[-100:]
        return FuzzFailure(f"{why}\n  message ({len(payload)} bytes): {shown!r}\n  reply: {str(reply)[:600]}")

    def exchange(self, payload: bytes, nfds: int = 0, *, fuzzed: bool = True) -> dict[str, Any] | None:
        sock = self._conn()
        self.counts["messages" if fuzzed else "own-requests"] += 1
        try:
            asked = proto.decode_request(payload, fds=nfds)
        except proto.ProtocolError:
            asked = None
        if isinstance(asked, proto.Grant) and asked.kind == "bound":
            self.asked_sizes.add(asked.geometry.umem_size)
        started = time.monotonic()
        try:
            if nfds:
                socket.send_fds(sock, [payload], [self.null] * nfds)
                self.counts["fds-attached"] += nfds
            else:
                sock.send(payload)
        except PermissionError:
            if not nfds:
                raise
            # the broker's sockets refuse fds (SO_PASSRIGHTS=0): the kernel turns the message away, no reply
            self.codes["refused-at-socket"] += 1
            self.counts["refused-at-socket"] += 1
            return None
        except OSError as e:
            raise self.fail(f"send failed: {e!r} (the broker closed the connection after an earlier reply?)",
                            payload) from None
        if not payload and not nfds:  # an empty message reads as end-of-file: the broker closes, no reply
            try:
                left = sock.recv(1)
            except OSError as e:
                left = repr(e).encode()
            if left:
                raise self.fail("an empty message got a reply instead of a close", payload, left)
            self.counts["closed-as-eof"] += 1
            self._drop()
            return None
        try:
            data, fds, flags, _ = socket.recv_fds(sock, proto.MAX_REPLY, 2 * proto.MAX_QUEUES + 1)
        except OSError as e:
            raise self.fail(f"no reply within {REPLY_TIMEOUT}s: {e!r}", payload) from None
        self.slowest = max(self.slowest, time.monotonic() - started)
        self.counts["replies"] += 1
        self.counts["fds-received"] += len(fds)
        try:
            return self.check(payload, nfds, data, fds, flags)
        finally:
            close_all(fds)

    def check(self, payload: bytes, nfds: int, data: bytes, fds: list[int], flags: int) -> dict[str, Any]:
        if not data:
            raise self.fail("the broker closed the connection instead of replying", payload)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise self.fail("reply truncated", payload, data[:200])
        try:
            reply = json.loads(data)
        except ValueError:
            raise self.fail("reply is not JSON", payload, data) from None
        if not (isinstance(reply, dict) and type(reply.get("v")) is int and reply["v"] == 1
                and reply.get("ok") in (True, False) and type(reply["ok"]) is bool and "op" in reply):
            raise self.fail("reply is not a v1 object with ok and op", payload, reply)
        req = _as_broker_reads(payload)
        op = req.get("op") if isinstance(req, dict) and isinstance(req.get("op"), str) else None
        has_id = isinstance(req, dict) and "id" in req and _valid_id(req["id"])
        if reply["op"] not in (None, op):
            raise self.fail(f"reply op {reply['op']!r} is not the request's {op!r}", payload, reply)
        if "id" in reply and not (has_id and reply["id"] == req["id"]):
            raise self.fail("reply id is not the request's", payload, reply)
        if not reply["ok"]:
            err = reply.get("error")
            if not (isinstance(err, dict) and isinstance(err.get("code"), str) and err["code"]
                    and isinstance(err.get("message"), str) and err["message"]):
                raise self.fail("error reply without error.code and error.message", payload, reply)
            if err["code"] == "internal-error":
                raise self.fail("internal-error: the broker hit an unexpected exception", payload, reply)
            if f"`{err['code']}`" not in self.documented:
                raise self.fail(f"error code {err['code']!r} is not in docs/protocol.md", payload, reply)
            if fds:
                raise self.fail("an error reply carried fds", payload, reply)
            self.codes[err["code"]] += 1
            return reply
        self.codes["ok"] += 1
        if len(payload) > proto.MAX_REQUEST or nfds or op is None:
            raise self.fail("accepted a message it must refuse", payload, reply)
        if reply["op"] != op or has_id != ("id" in reply):
            raise self.fail("ok reply does not echo op and id", payload, reply)
        indexes = _fd_indexes(reply)
        if op != "grant" and fds:
            raise self.fail("a reply other than grant carried fds", payload, reply)
        if op == "grant":
            if sorted(indexes) != list(range(len(fds))) or not fds:
                raise self.fail(f"grant reply names fds {sorted(indexes)} but carried {len(fds)}", payload, reply)
            self.counts[f"granted-{reply.get('kind')}"] += 1
            if self.held is None and reply.get("kind") != "map":
                self.held = (reply["lease"], fds[:])  # later grants of its queues in this batch find them busy
                fds.clear()
            else:
                self.release(reply["lease"], fds)
        return reply

    def release(self, lease: str, fds: list[int]) -> None:
        close_all(fds)  # the library's order: close the sockets, then release the lease
        fds.clear()
        ended = self.exchange(proto.encode_request(proto.Release(lease)), fuzzed=False)
        if not ended or not ended["ok"]:
            raise self.fail("releasing a lease just granted failed", b"", ended)

    def end_batch(self, n: int) -> None:
        """Let go of the lease held, then a hello with a fresh id: a stray extra reply to an earlier message
        would arrive in its place."""
        if self.held:
            lease, fds = self.held
            self.held = None
            self.release(lease, fds)
        reply = self.exchange(proto.encode_request(proto.Hello(req_id=f"sentinel-{n}")), fuzzed=False)
        if not reply or reply.get("id") != f"sentinel-{n}":
            raise self.fail("replies out of step: the sentinel hello got another reply", b"", reply)


def _as_broker_reads(payload: bytes) -> Any:
    """The request as the broker's decoder sees it (same json module), or None when it cannot parse it."""
    if len(payload) > proto.MAX_REQUEST:
        return None
    try:
        return json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _valid_id(value: Any) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _fd_indexes(reply: dict[str, Any]) -> list[int]:
    out = [reply["map_fd"]] if isinstance(reply.get("map_fd"), int) else []
    for s in reply.get("sockets") or []:
        out += [s[k] for k in ("fd", "umem_fd") if isinstance(s.get(k), int)]
    return out


def _map_grant(path: str, iface: str) -> str:
    reply, fds = request_fds(iface, [], kind="map", socket_path=path)
    close_all(fds)
    return str(reply["kind"])


def fuzz_consumer(path: str, messages: int, batch: int, seed: int, docs: str) -> dict[str, Any]:
    """Runs unprivileged: hypothesis generates batches of messages, each batch sent on the live broker.
    `docs` is docs/protocol.md, read by the parent: the clone may sit where this uid cannot enter."""
    sys.setrecursionlimit(20_000)  # parse as deep as the broker might, to know what it saw
    client = FuzzClient(path, docs)
    examples = max(1, math.ceil(messages / batch))
    batches = iter(range(1 << 62))

    @hypothesis.seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
    @given(st.lists(MESSAGES, min_size=batch, max_size=batch))
    def run(msgs: list[tuple[bytes, int]]) -> None:
        for payload, nfds in msgs:
            client.exchange(payload, nfds)
        client.end_batch(next(batches))

    started = time.monotonic()
    try:
        run()
    finally:
        client.close()
    return {"seconds": time.monotonic() - started, "counts": dict(client.counts), "codes": dict(client.codes),
            "asked_sizes": sorted(client.asked_sizes), "slowest_ms": ms(client.slowest)}


@contextlib.contextmanager
def fuzz_bed() -> Iterator[BrokerProcess]:
    """A broker in a namespace with two veth pairs: xsk0 (two queues) for bound and bare grants, xsk1 for the
    map grant (which holds its interface until the holder exits)."""
    with VethNamespace(ns_name(), inside="xsk0", peer="xsk0p", queues=2) as ns:
        ns.add_veth("xsk1", "xsk1p")
        with BrokerProcess(ns.name, FUZZ_POLICY, umem_pool=UMEM_POOL) as b:
            yield b


def test_fuzzedMESSAGES_each_get_one_well_formed_reply(figures) -> None:  # type: ignore[no-untyped-def]
    with fuzz_bed() as b:
        # the first grant on an interface attaches its XSK program, whose fds stay: before the baseline
        warm = spawn_unprivileged(grant_cycles, b.socket_path, "xsk0", [0, 1], 2, 0.0, uid=CONSUMER_UID).result()
        assert warm["ok"] == 2, warm
        assert spawn_unprivileged(_map_grant, b.socket_path, "xsk1", uid=CONSUMER_UID).result() == "map"
        wait_for(lambda: not status(b)["leases"], what="the warm-up map lease to end with its holder")
        before = census(b)
        rss_before = rss_kib(b.pid)
        child = spawn_unprivileged(fuzz_consumer, b.socket_path, FUZZ_MESSAGES, FUZZ_BATCH, FUZZ_SEED,
                                   DOCS.read_text(), uid=CONSUMER_UID)
        try:
            got = child.result(timeout=120 + FUZZ_MESSAGES / 50)
        except (RuntimeError, TimeoutError) as e:  # the broker's own account of what went wrong, if any
            errors = [r for r in b.records() if r.get("event") in ("internal-error", "reply-failed")]
            raise AssertionError(f"{e}\nbroker errors: {errors[-3:]}\nbroker alive: {running(b)}\n"
                                 f"replay with XSKBROKER_FUZZ_SEED={FUZZ_SEED}") from None
        finally:
            child.kill()
        alive(b)
        counts, codes = got["counts"], got["codes"]
        wait_for(lambda: not status(b)["leases"], what="no lease left once the fuzzer exited")
        after = assert_fds_back(b, before, exact=False)
        # the UMEM pool may now keep sockets of the sizes the fuzzer asked for in bound grants, a bounded number
        # of each: granted or not (a grant takes from the pool before its bind, which may still fail)
        pool = collections.Counter(after.memfd_sizes) - collections.Counter(before.memfd_sizes)
        assert all(n <= MAX_PER_GEOMETRY and size in got["asked_sizes"] for size, n in pool.items()), \
            (pool, got["asked_sizes"], f"replay with XSKBROKER_FUZZ_SEED={FUZZ_SEED}")
        assert sum(after.memfd_sizes) <= 64 * MiB
        alive(b)
        figures(seed=FUZZ_SEED, messages=counts["messages"], replies=counts["replies"],
                own_requests=counts.get("own-requests", 0), connections=counts["connections"],
                closed_as_eof=counts.get("closed-as-eof", 0),
                grants_allowed=sum(v for k, v in counts.items() if k.startswith("granted-")),
                fds_attached=counts.get("fds-attached", 0), fds_received=counts.get("fds-received", 0),
                distinct_codes=len(codes), codes=" ".join(f"{k}:{v}" for k, v in sorted(codes.items())),
                seconds=round(got["seconds"], 1),
                msgs_per_s=round(counts["messages"] / got["seconds"]), slowest_reply_ms=got["slowest_ms"],
                broker_fds=f"{before.total}->{after.total}", pooled_memfds_added=sum(pool.values()),
                rss_before_kib=rss_before, rss_after_kib=rss_kib(b.pid))
    assert counts["messages"] >= FUZZ_MESSAGES
    assert counts["replies"] == (counts["messages"] + counts.get("own-requests", 0) - counts.get("closed-as-eof", 0)
                                 - counts.get("refused-at-socket", 0))
    if FUZZ_MESSAGES >= 10_000:  # the generator reached far into the protocol: refusals, real grants of each kind
        for code in ("too-large", "refused-at-socket", "bad-json", "truncated", "bad-version", "unknown-op",
                     "bad-request", "ok", "not-admin", "unknown-lease", "queue-busy"):
            assert codes.get(code), (code, codes)
        assert len(codes) >= 15, codes
        assert all(counts.get(f"granted-{kind}") for kind in ("bound", "bare", "map")), counts
