"""Link events lost (the rtnetlink socket overran, ENOBUFS): the server has the service forget its cached XSK
programs, since a change of program may have gone unseen. A program still attached holds the leases' sockets in
its map, and release, revoke and the orphan poll read and empty their slots through the cached program: dropped,
a revoke emptied nothing though it said RX stopped, and a lease released with its sockets open ended at the next
look while its socket stayed in its slot, off the quota."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from xskbroker.broker.server import Server
from xskbroker.policy import parse_policy
from xskbroker.wire import protocol as proto

from .service_rig import ALICE, POLICY, ROOT, SMALL, Rig, finish, make_rig
from .test_service_release_kept import _kept


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Rig, Server]]:
    rig = make_rig(policy=parse_policy(POLICY + '[[quota]]\nname = "per-user"\nusers = ["*"]\nmax_queues = 1\n'))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s.sock"))
    listener.listen()
    server = Server(listener, rig.service, lambda record: None)
    yield rig, server
    server.close()
    listener.close()
    rig.service.close()


def _links_lost(server: Server) -> None:
    server._links_lost(OSError(errno.ENOBUFS, "No buffer space available"))


def test_a_revoke_after_link_events_were_lost_still_empties_the_slots(served: tuple[Rig, Server]) -> None:
    rig, server = served
    granted, _ = rig.grant(queues=(0,))
    _links_lost(server)
    done, _ = rig.reply(ROOT, proto.Revoke(lease=granted["lease"]))
    assert done["ok"] and done["revoked"][0]["emptied_queues"] == [0], done
    assert not rig.kernel.slot_taken(7, 0), "RX goes on: the socket is still in its slot"


def test_a_lease_released_with_its_sockets_kept_stays_charged_after_link_events_were_lost(
        served: tuple[Rig, Server]) -> None:
    rig, server = served
    lease_id, _ = _kept(rig)
    _links_lost(server)
    rig.service.check_orphans()
    assert rig.kernel.slot_taken(7, 0) and rig.service.leases.get(lease_id) is not None
    again = finish(rig, rig.ask(ALICE, proto.Grant("veth0", (1,), geometry=SMALL)), steps=200)
    assert not again["ok"] and again["error"]["code"] == "quota-queues", again


def test_interfaces_renamed_or_removed_while_link_events_were_lost_are_learnt_again(
        served: tuple[Rig, Server]) -> None:
    """The rename or removal the lost events told of is asked of the kernel: a lease kept the old name (status said
    veth0, and a revoke of veth0, once another interface took that name, hit the renamed one's lease), and a lease on
    a removed interface stayed on its quota until its holder exited."""
    rig, server = served
    renamed, _ = rig.grant(queues=(0,))
    rig.kernel.ifaces["veth5"] = rig.kernel.ifaces.pop("veth0")
    rig.kernel.ifaces["veth0"] = (17, 4)  # another interface takes the name
    _links_lost(server)
    lease = rig.service.leases.get(renamed["lease"])
    assert lease is not None and lease.ifname == "veth5", lease
    assert rig.events("interface-renamed")[0]["to"] == "veth5"
    refused, _ = rig.reply(ROOT, proto.Revoke(interface="veth0"))
    assert refused["error"]["code"] == "unknown-lease", refused
    del rig.kernel.ifaces["veth5"]
    _links_lost(server)
    assert rig.service.leases.get(renamed["lease"]) is None
    assert rig.events("lease-ended")[-1]["reason"] == "interface veth5 removed"
