"""hotplug.attach when a command goes unanswered (it times out, or Ctrl-C comes first) but QEMU carries it out late:
the unwind must still leave QEMU holding nothing of the attempt (docs/qemu.md, "Nothing is left half-done"), and
never touch a netdev or device it did not add. Against the fake QMP monitor of test_qmp_client (QEMU runs monitor
commands in order, and so does the fake); the real QEMU's side: tests/integration/test_qmp.py."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

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
    assert e.value.__notes__[-1] == "unwound: deleted netdev 'n0', added after netdev_add went unanswered (QEMU " \
        "closed its sockets)"
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


def test_a_device_add_that_lands_after_its_timeout_is_removed_before_its_netdev(fake: FakeQemu, qmp_path: str) -> None:
    fake.delay["device_add"] = 0.6  # answered (and done) after the client's 0.5 s: the device is in the guest then
    (a, b), = socketpairs(1)
    with q.QMP(qmp_path, timeout=0.5) as m, pytest.raises(q.QMPTimeout, match="did not answer device_add") as e:
        hotplug.attach(m, "n0", "eth1", [a.fileno()], device="virtio-net-pci")
    # a netdev_del alone would leave the device in the guest with a dead link, and its id taken
    assert not fake.devices and "n0" not in fake.netdevs and not fake.fds
    assert fake.commands() == ["getfd", "netdev_add", "device_add", "qom-get", "device_del", "netdev_del"]
    assert e.value.__notes__ == [
        "unwound: removed device 'n0-dev', added after device_add went unanswered (a guest that takes part in "
        "unplug releases it)",
        "unwound: deleted netdev 'n0' (QEMU closed its sockets)"]
    a.close()
    assert peer_closed(b)


def test_a_late_refused_device_add_never_removes_the_device_that_had_its_id(fake: FakeQemu, qmp_path: str) -> None:
    fake.devices["n0-dev"] = "existing"  # "Duplicate device ID", said after the timeout
    fake.delay["device_add"] = 0.6
    (a, b), = socketpairs(1)
    with q.QMP(qmp_path, timeout=0.5) as m, pytest.raises(q.QMPTimeout) as e:
        hotplug.attach(m, "n0", "eth1", [a.fileno()], device="virtio-net-pci")
    assert fake.commands() == ["getfd", "netdev_add", "device_add", "qom-get", "netdev_del"]
    assert e.value.__notes__ == ["unwound: deleted netdev 'n0' (QEMU closed its sockets)"]
    assert fake.devices == {"n0-dev": "existing"} and "n0" not in fake.netdevs and not fake.fds
    a.close()
    assert peer_closed(b)


def test_a_late_failed_device_add_leaves_only_the_netdev_to_delete(fake: FakeQemu, qmp_path: str) -> None:
    fake.delay["device_add"] = 0.6
    fake.fail["device_add"] = ("GenericError", "No 'PCI' bus found for device 'virtio-net-pci'")
    (a, _), = socketpairs(1)
    with q.QMP(qmp_path, timeout=0.5) as m, pytest.raises(q.QMPTimeout) as e:
        hotplug.attach(m, "n0", "eth1", [a.fileno()], device="virtio-net-pci")
    assert fake.commands()[-2:] == ["qom-get", "netdev_del"] and not fake.devices and "n0" not in fake.netdevs
    assert e.value.__notes__ == ["unwound: deleted netdev 'n0' (QEMU closed its sockets)"]


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in this (the main) thread, as at a terminal."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def interrupt_during(fake: FakeQemu, command: str) -> None:
    """Ctrl-C reaches the client while QEMU works on `command`, which QEMU then carries out all the same."""
    main, real_do = threading.get_ident(), fake._do

    def do(cmd: str, args: dict[str, Any], fds: list[int], after: list[dict[str, Any]]) -> Any:
        if cmd == command:
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.2)  # the client is interrupted (and unwinding) before the answer comes
        return real_do(cmd, args, fds, after)

    fake._do = do  # type: ignore[method-assign]


@pytest.mark.usefixtures("ctrl_c")
@pytest.mark.parametrize("command, undone", [
    ("netdev_add", ["closefd", "closefd", "netdev_del"]),
    ("device_add", ["qom-get", "device_del", "netdev_del"]),
])
def test_an_interrupted_attach_undoes_the_command_qemu_carries_out_after(fake: FakeQemu, qmp_path: str, command: str,
                                                                         undone: list[str]) -> None:
    interrupt_during(fake, command)
    pairs = socketpairs(2)
    with q.QMP(qmp_path, timeout=5) as m, pytest.raises(KeyboardInterrupt):
        hotplug.attach(m, "n0", "eth1", [a.fileno() for a, _ in pairs], device="virtio-net-pci")
    assert not fake.devices and "n0" not in fake.netdevs and not fake.fds
    assert fake.commands()[fake.commands().index(command) + 1:] == undone
    for a, b in pairs:
        a.close()
        assert peer_closed(b)
