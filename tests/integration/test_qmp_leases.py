"""Whose lease a QMP hand-over leaves, against the real QEMU binary and a real broker: the requester's, the
holder it names, or an orphan; and the lease's end with the sockets though QEMU lives on (issue 10).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from xskbroker.client import hotplug, qmp_cli
from xskbroker.client import qmp as q
from xskbroker.testbed.sandbox import BrokerProcess, VethNamespace

from .conftest import wait_for
from .paused_qemu import BARE_POLICY, SKIP, Qemu, qemu, skip_unless_bare_is_supported

pytestmark = SKIP


@pytest.fixture
def vm() -> Iterator[Qemu]:
    with qemu("-M", "none") as v:
        yield v


# ---- whose lease: the requester's, the holder it names, or an orphan -----------------------------------

def _status(path: str) -> list[dict]:
    from xskbroker.client.connection import Connection
    from xskbroker.wire import protocol as proto

    with Connection(path) as c:
        return c.call(proto.Status())[0]["leases"]


def _hand_to_qemu(qmp_path: str, reply: dict, fds: list[int]) -> None:
    with q.QMP(qmp_path, 5.0) as m:
        for s in reply["sockets"]:
            m.execute("getfd", {"fdname": hotplug.fd_name("xdp0", s["queue"])}, fds=[fds[s["fd"]]])
    hotplug.close_fds(fds)


def test_the_lease_follows_the_qemu_a_launcher_names_as_holder(veth: VethNamespace) -> None:
    from xskbroker.client.grant import request_fds

    with qemu("-M", "none") as vm, BrokerProcess(veth.name, BARE_POLICY) as broker:
        reply, fds = request_fds(veth.inside, 1, kind="bare", socket_path=broker.socket_path, holder_pid=vm.pid)
        _hand_to_qemu(vm.qmp_path, reply, fds)
        assert reply["holder_pid"] == vm.pid
        (lease,) = _status(broker.socket_path)
        assert lease["pid"] == vm.pid and not lease["orphaned"]
        vm.proc.kill()
        vm.proc.wait()
        wait_for(lambda: not _status(broker.socket_path), 5.0, "the lease to end with QEMU")
        ended = [r for r in broker.records() if r.get("event") == "lease-ended"]
        assert ended[-1]["pid"] == vm.pid and ended[-1]["reason"] == "holder exited"


def test_a_launcher_that_exits_after_passing_the_sockets_leaves_an_orphan_until_they_close(
        veth: VethNamespace) -> None:
    from xskbroker.client.grant import request_fds

    with qemu("-M", "none") as vm, BrokerProcess(veth.name, BARE_POLICY) as broker:
        pid = os.fork()
        if pid == 0:  # a launcher that names no holder, hands the sockets over and exits
            code = 1
            try:
                reply, fds = request_fds(veth.inside, 1, kind="bare", socket_path=broker.socket_path)
                _hand_to_qemu(vm.qmp_path, reply, fds)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        wait_for(lambda: [x for x in _status(broker.socket_path) if x["orphaned"]], 5.0, "the lease to be orphaned")
        with vm.connect() as m:
            m.execute("closefd", {"fdname": hotplug.fd_name("xdp0", 0)})
        wait_for(lambda: not _status(broker.socket_path), 10.0, "the orphan to end once QEMU closed the socket")
        reasons = [r["reason"] for r in broker.records() if r.get("event") in ("lease-orphaned", "lease-ended")]
        assert reasons == ["holder exited but its sockets are still open elsewhere", "its sockets were closed"]


def test_a_holder_of_another_user_is_refused(veth: VethNamespace) -> None:
    from xskbroker.testbed.sandbox import spawn_unprivileged

    def ask(path: str, iface: str) -> str:
        from xskbroker.client.grant import request_fds
        from xskbroker.wire import protocol as proto

        try:
            _, fds = request_fds(iface, 1, kind="bare", socket_path=path, holder_pid=1)
        except proto.BrokerError as e:
            return e.code
        hotplug.close_fds(fds)
        return "granted"

    with BrokerProcess(veth.name, BARE_POLICY.replace("users = [0]", "users = [0, 65534]")) as broker:
        assert spawn_unprivileged(ask, broker.socket_path, veth.inside, uid=65534).result() == "bad-holder"


# ---- the lease ends with the sockets, though QEMU lives on (issue 10) ----------------------------------

QUOTA_POLICY = BARE_POLICY + """
[[quota]]
name = "one-vm"
users = ["*"]
max_queues = 2
"""


def test_a_rolled_back_attach_releases_its_lease_so_a_retry_fits_the_quota(
        veth: VethNamespace, vm: Qemu, capsys: pytest.CaptureFixture[str]) -> None:
    with BrokerProcess(veth.name, QUOTA_POLICY) as broker:
        for _ in range(2):  # the second attempt reaches QEMU again: no stale lease holds the quota
            rc = qmp_cli.main(["qmp-attach", "--qmp", vm.qmp_path, "--id", "xdp0", "-i", veth.inside, "-q", "2",
                               "--socket", broker.socket_path, "--force", "--json"])
            out = json.loads(capsys.readouterr().out)
            skip_unless_bare_is_supported(out["error"]["code"], out["error"]["message"])
            assert rc == 1 and out["error"]["code"] == "qmp-error", out
            assert any(n.endswith("was released") for n in out["error"]["notes"]), out
            assert not _status(broker.socket_path)
        assert len([r for r in broker.records() if r.get("event") == "release"]) == 2


def test_a_bare_lease_ends_when_its_living_holder_closes_the_sockets(veth: VethNamespace) -> None:
    from xskbroker.client.grant import request_fds

    with qemu("-M", "none") as vm, BrokerProcess(veth.name, QUOTA_POLICY) as broker:
        reply, fds = request_fds(veth.inside, 2, kind="bare", socket_path=broker.socket_path, holder_pid=vm.pid)
        _hand_to_qemu(vm.qmp_path, reply, fds)
        time.sleep(2.5)  # at least one poll while QEMU holds them: the lease stays
        assert [x["lease"] for x in _status(broker.socket_path)] == [reply["lease"]]
        with vm.connect() as m:  # what netdev_del does: QEMU closes its sockets and lives on
            for s in reply["sockets"]:
                m.execute("closefd", {"fdname": hotplug.fd_name("xdp0", s["queue"])})
        wait_for(lambda: not _status(broker.socket_path), 6.0, "the lease to end once QEMU closed the sockets")
        ended = [r for r in broker.records() if r.get("event") == "lease-ended"]
        assert ended[-1]["lease"] == reply["lease"] and ended[-1]["pid"] == vm.pid
        assert ended[-1]["reason"] == "its sockets were closed while its holder lives"
        # a re-attach within the quota
        again, fds = request_fds(veth.inside, 2, kind="bare", socket_path=broker.socket_path, holder_pid=vm.pid)
        hotplug.close_fds(fds)
        assert again["lease"] != reply["lease"]


def test_a_requester_killed_mid_grant_leaves_no_socket_in_the_map(veth: VethNamespace) -> None:
    """A bare grant with memlock whose requester is SIGKILLed at once: whatever the broker got to, the
    queue is free again (no socket held by the broker itself, no lease), so the next grant succeeds."""

    from xskbroker.client.connection import Connection
    from xskbroker.client.grant import request_fds
    from xskbroker.wire import protocol as proto

    with BrokerProcess(veth.name, BARE_POLICY) as broker:
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                try:
                    c = Connection(broker.socket_path)
                    c.sock.send(proto.encode_request(proto.Grant(interface=veth.inside, queues=(0,), kind="bare",
                                                                 memlock=32 << 20)))
                finally:
                    os.kill(os.getpid(), signal.SIGKILL)
            os.waitpid(pid, 0)
            wait_for(lambda: not _status(broker.socket_path), 5.0, "the dead requester's lease to end")
            reply, fds = request_fds(veth.inside, 1, kind="bare", socket_path=broker.socket_path, timeout=10)
            hotplug.close_fds(fds)
            with Connection(broker.socket_path) as c:  # the library's order: close, then release
                c.call(proto.Release(reply["lease"]))
        assert not [r for r in broker.records() if r.get("event") == "internal-error"]


def test_a_grant_whose_reply_fails_frees_its_queue_for_the_very_next_grant(veth: VethNamespace) -> None:
    """The requester dies before its reply is sent: the grant is aborted, and its socket leaves the map slot
    then and there, not when a closer thread gets to close the broker's copy. The next grant was already
    waiting (sent while the broker paused before the failing send), so it is decided right after the abort:
    before the fix it found the aborted socket still in the slot and was refused `queue-busy`."""

    from xskbroker.client.connection import Connection
    from xskbroker.client.grant import request_fds
    from xskbroker.wire import protocol as proto

    with BrokerProcess(veth.name, BARE_POLICY, env={"XSKBROKER_FAULT": "before-send:pause=0.4"}) as broker:
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                try:
                    c = Connection(broker.socket_path)
                    c.sock.send(proto.encode_request(proto.Grant(interface=veth.inside, queues=(0,), kind="bare")))
                    time.sleep(0.1)  # the broker has read it and sleeps before its reply
                finally:
                    os.kill(os.getpid(), signal.SIGKILL)
            os.waitpid(pid, 0)
            reply, fds = request_fds(veth.inside, [0], kind="bare", socket_path=broker.socket_path, timeout=10)
            hotplug.close_fds(fds)
            with Connection(broker.socket_path) as c:  # the library's order: close, then release
                c.call(proto.Release(reply["lease"]))
        aborted = [r for r in broker.records() if r.get("event") == "lease-aborted"]
        assert len(aborted) == 3, aborted


def test_a_bare_queue_is_free_as_soon_as_its_holder_closes_its_sockets(veth: VethNamespace) -> None:
    """The broker keeps no copy of a bare socket after its reply (a kept copy, however brief, left the slot
    taken after the holder closed its own: the very next grant got `queue-busy`)."""

    from xskbroker.client.grant import request_fds

    with BrokerProcess(veth.name, BARE_POLICY) as broker:
        for _ in range(20):  # a queue still taken makes request_fds raise (queue-busy)
            reply, fds = request_fds(veth.inside, [0], kind="bare", socket_path=broker.socket_path, timeout=10)
            hotplug.close_fds(fds)
            assert [s["queue"] for s in reply["sockets"]] == [0], reply
        grants = [r for r in broker.records() if r.get("event") == "grant"]
        assert len(grants) == 20 and all(g["decision"] == "allow" for g in grants), grants
