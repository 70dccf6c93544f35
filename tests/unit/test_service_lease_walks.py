"""What a client's request costs the loop must not grow with the leases others hold: a grant, a holder's exit and
a status each looked at every lease in the table (a walk of the whole table to find one interface's, one pid's or
one user's leases). Work is counted in byte-code instructions (service_rig.opcodes), not timed."""

from __future__ import annotations

from collections.abc import Callable

from xskbroker.wire import protocol as proto

from .service_rig import ALICE, Rig, make_rig, opcodes

OTHERS = 3000


def _work(others: int, request: Callable[[Rig], object], check: Callable[[Rig, object], bool]) -> int:
    """The work of request(rig) once Alice holds one lease on veth0, with `others` leases of other users on other
    interfaces, each of another holder, in the table (check(rig, its result) says it did its job)."""
    rig = make_rig()
    for i in range(others):
        rig.service.leases.add(5000 + i, 50_000 + i, 100 + i, f"x{i}", (0,), "bound", 1 << 20, (5000 + i,))
    reply, out = rig.grant(queues=(0,))
    assert reply["ok"], reply
    rig.kernel.holder_closes(out.fds)  # its socket closed: an exit ends the lease (else it is orphaned)
    _status(rig)  # what a first status imports or caches is not counted
    try:
        result: list[object] = []
        work = opcodes(lambda: result.append(request(rig)))
        assert check(rig, result[0]), result
        return work
    finally:
        rig.service.close()


def _grant(rig: Rig) -> object:
    return rig.grant(queues=(1,))[0]


def _exit(rig: Rig) -> object:
    return rig.service.holder_exited(ALICE.pid, ALICE.start, ALICE.ino)


def _status(rig: Rig) -> object:
    return rig.reply(ALICE, proto.Status())[0]


def _granted(rig: Rig, reply: object) -> bool:
    return isinstance(reply, dict) and bool(reply["ok"])


def _ended(rig: Rig, _: object) -> bool:
    return not [x for x in rig.service.leases if x.pid == ALICE.pid]


def _listed(rig: Rig, reply: object) -> bool:
    return isinstance(reply, dict) and reply["ok"] and len(reply["leases"]) == 1 and len(reply["interfaces"]) == 1


def test_a_grant_does_not_walk_every_lease() -> None:
    """Every bound and bare grant looks for misbound bare sockets on its interface (check_bare), which listed the
    interface's leases by walking the whole table: 3,000 leases elsewhere made each grant ~50,000 instructions
    dearer, for any client that asks (a refused busy queue too)."""
    alone, crowded = _work(0, _grant, _granted), _work(OTHERS, _grant, _granted)
    assert crowded < alone + 500, (alone, crowded)


def test_a_holders_exit_does_not_walk_every_lease() -> None:
    """A holder's exit ended its leases, found by walking the whole table: a client that takes a grant and exits,
    again and again, made each exit cost the loop every lease."""
    alone, crowded = _work(0, _exit, _ended), _work(OTHERS, _exit, _ended)
    assert crowded < alone + 500, (alone, crowded)


def test_a_status_does_not_walk_every_lease() -> None:
    """Any client may ask status: its own leases were picked by walking the whole table, and each interface's lease
    count was another walk of it (O(interfaces x leases) per request)."""
    alone, crowded = _work(0, _status, _listed), _work(OTHERS, _status, _listed)
    assert crowded < alone + 500, (alone, crowded)
