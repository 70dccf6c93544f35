"""hotplug.attach when a command times out but QEMU carries it out late: the unwind must still leave QEMU holding
nothing of the attempt (docs/qemu.md, "Nothing is left half-done"), and never touch a netdev it did not add.
Against the fake QMP monitor of test_qmp_client (QEMU runs monitor commands in order, and so does the fake)."""

from __future__ import annotations

import pytest

from xskbroker.client import hotplug
from xskbroker.client import qmp as q

from .test_qmp_client import FakeQemu, fake, peer_closed, qmp_path, socketpairs

__all__ = ["fake", "qmp_path"]  # fixtures


def test_a_netdev_add_that_lands_after_its_timeout_is_deleted(fake: FakeQemu, qmp_path: str) -> None:
    fake.delay["netdev_add"] = 0.6  # answered (and done) after the client's 0.5 s: the netdev exists then
    pairs = socketpairs(2)
    with q.QMP(qmp_path, timeout=0.5) as m, pytest.raises(q.QMPTimeout, match="did not answer netdev_add") as e:
        hotplug.attach(m, "n0", "eth1", [a.fileno() for a, _ in pairs], device="virtio-net-pci")
    assert fake.commands() == ["getfd", "getfd", "netdev_add", "closefd", "closefd", "netdev_del"]
    assert e.value.__notes__[-1] == "unwound: deleted netdev 'n0', added after netdev_add timed out (QEMU closed its " \
        "sockets)"
    assert "n0" not in fake.netdevs and not fake.fds  # QEMU holds nothing of the attempt
    for a, b in pairs:
        a.close()
        assert peer_closed(b)


def test_a_late_refused_netdev_add_never_deletes_the_existing_netdev(fake: FakeQemu, qmp_path: str) -> None:
    fake.delay["netdev_add"] = 0.6  # "Duplicate ID", said after the timeout
    (a, _), = socketpairs(1)
    with q.QMP(qmp_path, timeout=0.5) as m, pytest.raises(q.QMPTimeout):
        hotplug.attach(m, "existing", "eth1", [a.fileno()])
    assert "netdev_del" not in fake.commands() and "existing" in fake.netdevs and not fake.fds
