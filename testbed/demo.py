"""`xskbroker demo`: the whole path on a private veth, with a consumer that holds no privilege."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from xskbroker.policy.sizes import format_size, parse_size

if TYPE_CHECKING:
    from xskbroker.testbed.sandbox import BrokerProcess

POLICY = """\
version = 1

[[allow]]
name = "demo-consumer"
users = [{uid}]
interfaces = ["{ifname}"]
queues = [0]
kinds = ["bound"]
max_queues = 1
max_umem = "{umem}"
"""


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every `with` below: namespace and broker are removed


def run(packets: int, uid: int, umem: int) -> tuple[dict[str, Any], BrokerProcess]:
    from xskbroker.testbed.sandbox import BrokerProcess, PacketPeer, VethNamespace, echo_consumer, spawn_unprivileged

    name = f"xskdemo-{os.getpid()}"
    with VethNamespace(name, inside="xskd0", peer="xskd0p") as ns:
        # the rings count with the UMEM against max_umem: room for the largest (4 x 65536 entries, 3 MiB)
        policy = POLICY.format(uid=uid, ifname=ns.inside, umem=umem + (3 << 20))
        with BrokerProcess(name, policy, umem_pool="64MiB") as broker:
            peer = PacketPeer(name, ns.peer, ns.mac(ns.inside))
            child = spawn_unprivileged(echo_consumer, broker.socket_path, ns.inside, 0, packets, umem, uid=uid)
            try:
                try:
                    peer.wait_ready()
                except TimeoutError:
                    if not child.alive():
                        child.result()  # raises with the consumer's own error
                    raise
                traffic = peer.exchange(packets)
                result = child.result()
            finally:
                child.kill()
                peer.close()
            result.update(packets_sent=traffic["sent"], peer_captured=traffic["replies"],
                          seconds=round(traffic["seconds"], 3), namespace=name,
                          decisions=[r for r in broker.records() if r.get("event") == "grant"])
            return result, broker


def main(args: argparse.Namespace) -> int:
    from xskbroker.wire import protocol as proto
    from xskbroker.wire.errors import BrokerError

    try:  # a UMEM the broker's codec refuses is said before any namespace is made, in the codec's words
        proto.decode_request(proto.encode_request(proto.Grant("xskd0", (0,), geometry=proto.Geometry(
            umem_size=parse_size(args.umem)))))
    except proto.ProtocolError as e:
        print(f"xskbroker demo: --umem {args.umem}: {e.message}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("xskbroker demo: needs root (it creates a network namespace and runs a broker)", file=sys.stderr)
        return 2
    try:
        import pyroute2  # type: ignore[import-untyped]  # noqa: F401  # the test bed's links are made with it
    except ModuleNotFoundError:
        print("xskbroker demo: needs pyroute2 (pip install 'xskbroker[demo]'; `make demo` installs it)",
              file=sys.stderr)
        return 2
    old = signal.signal(signal.SIGTERM, _terminate)
    try:
        result, broker = run(args.packets, args.uid, parse_size(args.umem))
    except (RuntimeError, OSError, TimeoutError, BrokerError) as e:
        print(f"xskbroker demo: failed: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old)
    ok = result["rx_packets"] == result["tx_packets"] == result["peer_captured"] == args.packets
    result["ok"] = ok
    result["grant_latency_ms"] = round(result["grant_latency_ms"], 3)
    if args.json:
        result.pop("capabilities", None)
        print(json.dumps(result))
    else:
        caps = result.get("capabilities", {})
        print(f"namespace {result['namespace']}: broker granted queue 0 of xskd0 to uid {result['consumer_uid']} "
              f"(CapEff {caps.get('CapEff', '?')}) in {result['grant_latency_ms']:.2f} ms, "
              f"UMEM {format_size(args_umem(args))}")
        print(f"XDP program in {result['xdp_mode']} mode, socket bound in {result['bind_mode']} mode")
        print(f"peer sent {result['packets_sent']} frames; consumer received {result['rx_packets']} and sent "
              f"{result['tx_packets']} replies; peer captured {result['peer_captured']} "
              f"in {result['seconds']:.2f} s")
        print("OK: every frame went both ways" if ok else "FAILED: frames were lost")
        if args.keep_logs:
            print(broker.log())
    return 0 if ok else 1


def args_umem(args: argparse.Namespace) -> int:
    return parse_size(args.umem)
