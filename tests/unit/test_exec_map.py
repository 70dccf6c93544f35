"""`xskbroker exec --kind map`: which queues it asks for, {map_path} and {queues}/{start_queue} for a map grant's
consumer (QEMU's map-path=/map-start-index=), and what it tells before running a consumer that will fail."""

from __future__ import annotations

from typing import Any

import pytest

from xskbroker.broker.cli import build_parser
from xskbroker.client import launch

MAP_REPLY = {"v": 1, "ok": True, "op": "grant", "lease": "L1", "kind": "map", "interface": "eth1", "ifindex": 7,
             "xdp_mode": "skb", "xdp_prog_id": 9, "map_fd": 0, "map_entries": 4,
             "map_pin": "/run/xskbroker/bpf/1000/eth1/xsks_map"}
QEMU_NETDEV = "af-xdp,ifname={ifname},queues={queues},start-queue={start_queue},inhibit=on,map-path={map_path}," \
              "map-start-index={start_queue}"


def test_a_map_grant_fills_qemus_map_path_netdev() -> None:
    grant = launch.grant_env(MAP_REPLY, [11], [2, 3])
    assert grant["map_fd"] == 11 and grant["queues"] == [2, 3]
    argv = launch.substitute([QEMU_NETDEV], launch.substitutions(grant), grant)
    assert argv == ["af-xdp,ifname=eth1,queues=2,start-queue=2,inhibit=on,"
                    "map-path=/run/xskbroker/bpf/1000/eth1/xsks_map,map-start-index=2"]


def test_a_map_grant_on_every_queue_names_every_slot() -> None:
    grant = launch.grant_env(MAP_REPLY, [11])
    values = launch.substitutions(grant)
    assert (values["queues"], values["start_queue"]) == ("4", "0")


def test_map_path_without_a_pin_says_why() -> None:
    unpinned = {k: v for k, v in MAP_REPLY.items() if k != "map_pin"}
    grant = launch.grant_env(unpinned, [11], [2])
    with pytest.raises(KeyError) as e:
        launch.substitute(["map-path={map_path}"], launch.substitutions(grant), grant)
    assert "cannot fill {map_path}" in e.value.args[0] and "--pin-root" in e.value.args[0]

    bare = {**MAP_REPLY, "kind": "bare", "sockets": [{"queue": 0, "fd": 0}]}
    bare.pop("map_fd")
    bare.pop("map_pin")
    grant = launch.grant_env(bare, [5])
    with pytest.raises(KeyError) as e:
        launch.substitute(["map-path={map_path}"], launch.substitutions(grant), grant)
    assert "--kind map" in e.value.args[0]
    # an argument that does not use it is fine
    assert launch.substitute(["sock-fds={sock_fds}"], launch.substitutions(grant), grant) == ["sock-fds=5"]


def test_a_map_consumer_is_warned_of_what_it_lacks() -> None:
    need = 32 << 20
    lacks_all = launch.map_consumer_warnings(["qemu"], need, 8 << 20, net_raw=False, ipc_lock=False)
    assert len(lacks_all) == 2
    assert "without CAP_NET_RAW" in lacks_all[0] and "socket(AF_XDP)" in lacks_all[0]
    assert f"RLIMIT_MEMLOCK is {8 << 20} bytes but the UMEM needs {need}" in lacks_all[1]
    assert launch.map_consumer_warnings(["qemu"], need, 8 << 20, net_raw=True, ipc_lock=True) == []
    assert launch.map_consumer_warnings(["qemu"], need, None, net_raw=True, ipc_lock=False) == []  # unlimited
    assert launch.map_consumer_warnings(["qemu"], need, need, net_raw=True, ipc_lock=False) == []
    assert launch.map_consumer_warnings(["qemu"], 0, 1, net_raw=True, ipc_lock=False) == []  # --memlock 0


@pytest.mark.parametrize(("args", "asked"), [
    (["--kind", "map"], []),  # every queue of the interface, as before
    (["--kind", "map", "--queues", "2", "--start-queue", "1"], [1, 2]),
    (["--queues", "2", "--start-queue", "1"], [1, 2]),
    ([], [0]),
])
def test_exec_asks_for_the_queues_it_was_given(monkeypatch: pytest.MonkeyPatch, args: list[str],
                                               asked: list[int]) -> None:
    from xskbroker.client import grant

    seen: dict[str, Any] = {}

    def fake_request(interface: str, queues: list[int], **kw: Any) -> tuple[dict[str, Any], list[int]]:
        seen["queues"], seen["memlock"] = list(queues), kw["memlock"]
        reply = MAP_REPLY if kw["kind"] == "map" else {**MAP_REPLY, "kind": "bare", "memlock": {"ok": True}}
        return reply, []

    def fake_exec(reply: dict[str, Any], fds: list[int], command: list[str], queues: list[int] = ()) -> None:
        seen["exec_queues"] = list(queues)
        raise OSError(2, "not run here")

    monkeypatch.setattr(grant, "request_fds", fake_request)
    monkeypatch.setattr(launch, "exec_with_grant", fake_exec)
    monkeypatch.setattr(launch, "map_consumer_warnings", lambda *a, **k: [])
    parsed = build_parser().parse_args(["exec", "--interface", "eth1", *args, "--", "qemu"])
    assert parsed.func(parsed) == 127
    assert seen["queues"] == asked and seen["exec_queues"] == asked
    assert (seen["memlock"] == 0) == ("map" in args)  # the broker raises memlock for bare grants only
