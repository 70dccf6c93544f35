"""A queue the kernel is late to let go of is not called squatted. The last lease on it ended with its socket
closed, but the kernel frees the queue in deferred work: on a busy system (the load test beside two CPU hogs)
that took over BUSY_RETRY_SECONDS, and the grant waiting for it was refused `queue-squatted`, "bound by an
AF_XDP socket the broker did not make", sending an operator after a process that does not exist."""

from __future__ import annotations

from xskbroker.broker.boundgrants import FREED_LATELY
from xskbroker.broker.kernel import BUSY_RETRY_SECONDS
from xskbroker.wire import protocol as proto

from .service_rig import ALICE, ROOT, SMALL, Rig, finish, make_rig


def _kernel_keeps_queue_0(rig: Rig) -> None:
    rig.kernel.stuck.add(0)  # every bind answers EBUSY
    rig.kernel.bound_elsewhere.add(0)  # and the kernel reports a socket's pool on the queue


def _wait_out(rig: Rig) -> dict[str, object]:
    out = rig.ask(ALICE, proto.Grant("veth0", (0,), geometry=SMALL))
    rig.now[0] += BUSY_RETRY_SECONDS + 0.1
    return finish(rig, out)


def test_a_queue_whose_last_lease_closed_its_socket_lately_is_busy_not_squatted() -> None:
    rig = make_rig()
    reply, out = rig.grant(queues=(0,))
    rig.kernel.holder_closes(out.fds)
    assert rig.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
    assert len(rig.service.leases) == 0
    _kernel_keeps_queue_0(rig)
    error = _wait_out(rig)["error"]
    assert isinstance(error, dict)
    assert error["code"] == "queue-busy" and "still being let go of by the kernel" in error["message"], error
    assert error["lease"] == reply["lease"] and "did not make" not in error["message"]
    assert rig.kernel.left() == {}
    rig.service.close()


def test_long_after_the_last_lease_a_bound_queue_is_a_squatters() -> None:
    rig = make_rig()
    reply, out = rig.grant(queues=(0,))
    rig.kernel.holder_closes(out.fds)
    assert rig.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
    rig.now[0] += FREED_LATELY
    _kernel_keeps_queue_0(rig)
    error = _wait_out(rig)["error"]
    assert isinstance(error, dict) and error["code"] == "queue-squatted", error
    rig.service.close()


def test_a_revoked_lease_whose_holder_kept_its_socket_is_still_named_a_squatter() -> None:
    """Revoke empties the slots, and a holder that keeps its fds keeps its socket bound: not a late release."""
    rig = make_rig()
    reply, _ = rig.grant(queues=(0,))
    assert rig.reply(ROOT, proto.Revoke(lease=reply["lease"]))[0]["ok"]
    assert rig.reply(ALICE, proto.Release(reply["lease"]))[0]["ok"]
    assert len(rig.service.leases) == 0
    _kernel_keeps_queue_0(rig)
    error = _wait_out(rig)["error"]
    assert isinstance(error, dict) and error["code"] == "queue-squatted", error
    rig.service.close()


def test_a_queue_a_refused_grant_bound_and_closed_lately_is_busy_not_squatted() -> None:
    """A grant that bound queue 0 and then failed on queue 1 closes its bound socket: the kernel frees queue 0 as
    late as after a lease's end, and the next grant of it must not be sent after a squatter that never was."""
    rig = make_rig()
    rig.kernel.stuck.add(1)
    failed = rig.ask(ALICE, proto.Grant("veth0", (0, 1), geometry=SMALL))
    rig.now[0] += BUSY_RETRY_SECONDS + 0.1
    assert not finish(rig, failed)["ok"]
    _kernel_keeps_queue_0(rig)
    error = _wait_out(rig)["error"]
    assert isinstance(error, dict)
    assert error["code"] == "queue-busy" and "did not make" not in error["message"], error
    rig.service.close()
