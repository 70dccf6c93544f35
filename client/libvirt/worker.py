"""The worker's job: plug every interface a domain declares into its QEMU (grant through the agent, then the
hot-plug sequence over the monitor), recording each step in the domain's state file and log."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from xskbroker.client import hotplug, qemu_support
from xskbroker.client.libvirt.agent import BrokerAgent, Granter
from xskbroker.client.libvirt.config import Config
from xskbroker.client.libvirt.identity import Identity
from xskbroker.client.libvirt.metadata import Interface
from xskbroker.client.libvirt.monitors import LoggedMonitor, WorkerMonitor
from xskbroker.client.libvirt.state import write_state
from xskbroker.client.qmp_codec import QMPConnectionError, QMPError, QMPTimeout
from xskbroker.common.procfs import process_start
from xskbroker.wire import protocol as proto


class Terminated(BaseException):
    """SIGTERM (the stopped/release hook ends a worker whose QEMU is gone): unwind, write nothing more."""


def _queues_text(iface: Interface) -> str:
    last = iface.start_queue + iface.queues - 1
    return str(iface.start_queue) if iface.queues == 1 else f"{iface.start_queue}-{last}"


def plug(iface: Interface, monitor: hotplug.Monitor, agent: Granter, qemu_pid: int,
         log: Callable[[str], None]) -> dict[str, Any]:
    """Grant, then getfd/netdev_add/device_add; on failure unwind in QEMU and release. Returns the record."""
    rec: dict[str, Any] = {"id": iface.id, "interface": iface.name, "queues": list(iface.queue_ids),
                           "device": iface.device, "status": "failed", "lease": None, "released": False}
    # with CAP_IPC_LOCK QEMU's UMEM is not charged to its limit: nothing to ask for or warn about
    ipc_lock = qemu_support.has_ipc_lock(qemu_pid)
    memlock = 0 if ipc_lock else qemu_support.umem_bytes(iface.queues)
    log(f"{iface.id}: asking the broker at {agent.socket_path} as {agent.ident} for a bare grant of {iface.name} "
        f"queue(s) {_queues_text(iface)}, held by QEMU (pid {qemu_pid}), "
        + ("no memlock (QEMU has CAP_IPC_LOCK)" if ipc_lock else f"memlock {memlock >> 20} MiB"))
    try:
        reply, fds = agent.grant(iface.name, iface.queues, iface.start_queue, qemu_pid, memlock)
    except proto.BrokerError as e:
        unasked = e.code in ("agent-failed", "connection-error", "broker-timeout")
        log(f"{iface.id}: {'could not ask the broker' if unasked else 'the broker refused'}: {e.code}: {e.message}")
        rec["error"] = {"stage": "grant", "code": e.code, "message": e.message}
        return rec
    lease = reply.get("lease")
    rec.update(lease=lease, xdp_mode=reply.get("xdp_mode"))
    log(f"{iface.id}: lease {lease}: {len(fds)} socket(s) on {reply.get('interface')}, XDP {reply.get('xdp_mode')} "
        "mode")
    ml = reply.get("memlock")
    if isinstance(ml, dict) and ml.get("raised"):
        log(f"{iface.id}: the broker raised QEMU's RLIMIT_MEMLOCK to {memlock} bytes")
    elif isinstance(ml, dict) and not ml.get("ok", True):
        log(f"{iface.id}: warning: QEMU's RLIMIT_MEMLOCK looks too low for its UMEM: {ml.get('reason')}; "
            f"{ml.get('hint')}")
    try:  # closes this process's copies: QEMU holds its own now, or the attempt was undone
        att = hotplug.attach_grant(monitor, iface.id, reply, fds, interface=iface.name, start_queue=iface.start_queue,
                                   queues=iface.queues, device=iface.device, device_props=iface.device_props() or None)
    except QMPError as e:
        notes = list(getattr(e, "__notes__", ()))
        log(f"{iface.id}: QEMU refused {e.command}: {e.desc}")
        rec["error"] = {"stage": e.command, "qmp_class": e.error_class, "message": e.desc, "notes": notes}
    except (QMPTimeout, QMPConnectionError, ValueError) as e:
        notes = list(getattr(e, "__notes__", ()))
        log(f"{iface.id}: {e}")
        rec["error"] = {"stage": "reply" if isinstance(e, ValueError) else "monitor", "message": str(e),
                        "notes": notes}
        rec["monitor_lost"] = isinstance(e, QMPConnectionError)
    else:
        rec.update(status="attached", netdev=att.netdev, device_id=att.device_id, device_args=att.device)
        dev = f", device {att.device_id!r} ({iface.device})" if att.device_id else " (no device)"
        log(f"{iface.id}: attached: af-xdp netdev {iface.id!r} on {iface.name} queue(s) {_queues_text(iface)}{dev}; "
            f"QEMU holds the only copies of the sockets: lease {lease} ends when QEMU exits")
        return rec
    for note in rec["error"]["notes"]:
        log(f"{iface.id}:   {note}")
    log(f"{iface.id}: this process closed its copies of the sockets")
    try:  # nothing of the grant is left anywhere: end the lease now, not when QEMU exits
        agent.release(str(lease))
        rec["released"] = True
        log(f"{iface.id}: released lease {lease}")
    except proto.BrokerError as e:
        log(f"{iface.id}: could not release lease {lease}: {e.code}: {e.message}")
    return rec


def warn_if_no_af_xdp(monitor: WorkerMonitor, log: Callable[[str], None]) -> str | None:
    """A warning (not a refusal: QEMU's own error will say it) when this QEMU lists no af-xdp backend."""
    try:
        version = monitor.version()
        support = qemu_support.netdev_support(monitor.execute("query-qmp-schema"))
    # the reply's shapes are the peer's (only a warning depends on them): a wrong one is not a crash
    except (QMPError, QMPTimeout, QMPConnectionError, AttributeError, TypeError, ValueError) as e:
        log(f"could not read QEMU's netdev backends: {e}")
        return None
    reason = qemu_support.unsupported_message(version, monitor.describe(), support)
    if reason:
        log(f"warning: {reason}; trying anyway: QEMU's own error follows")
    return reason


def run_worker(domain: str, interfaces: Sequence[Interface], cfg: Config, monitor: WorkerMonitor,
               log: Callable[[str], None], state_path: str | None = None,
               agent_factory: Callable[[Identity, str, float], Granter] | None = None) -> dict[str, Any]:
    """Plug every interface into the domain's QEMU. Writes the state file after each step; returns the state."""
    state: dict[str, Any] = {"domain": domain, "worker_pid": os.getpid(),
                             "worker_start": process_start(os.getpid()), "monitor": monitor.describe(),
                             "socket": cfg.socket, "started_at": time.time(), "finished": False, "interfaces": []}

    def save() -> None:
        if state_path:
            write_state(state_path, state)

    save()
    log(f"worker started for {len(interfaces)} interface(s); monitor: {monitor.describe()}")
    try:
        monitor.open(time.monotonic() + 2 * cfg.timeout)
        pid = monitor.pid()
        ident = Identity.of_process(pid)
        monitor.confirm(pid, ident)  # the pid read is still the process behind the monitor, as that user
    except (QMPError, QMPTimeout, QMPConnectionError, OSError, ValueError) as e:
        log(f"cannot reach QEMU through {monitor.describe()}: {e}")
        state.update(finished=True, error=str(e))
        save()
        monitor.close()
        return state
    state.update(qemu_pid=pid, qemu_start=process_start(pid),
                 identity={"uid": ident.uid, "gid": ident.gid, "groups": list(ident.groups)})
    save()
    log(f"QEMU pid {pid} runs as {ident}")
    try:
        state["af_xdp_warning"] = warn_if_no_af_xdp(monitor, log)
        # the agent asks as QEMU's user and from QEMU's cgroup: the VM's identity is the one judged
        factory = agent_factory or functools.partial(BrokerAgent, join=pid)
        agent = factory(ident, cfg.socket, cfg.timeout)
        try:
            for iface in interfaces:
                rec = plug(iface, LoggedMonitor(monitor, log, f"{iface.id}: "), agent, pid, log)
                state["interfaces"].append(rec)
                save()
                if rec.get("monitor_lost"):
                    log("QEMU's monitor is gone: stopping")
                    break
        finally:
            agent.close()
    finally:
        monitor.close()
    attached = sum(r["status"] == "attached" for r in state["interfaces"])
    log(f"done: {attached} of {len(interfaces)} interface(s) attached")
    state["finished"] = True
    save()
    return state
