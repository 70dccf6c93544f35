"""The worker's life and the domain's end: spawning the worker detached from libvirt (`started`), stopping a
worker still waiting for a QEMU that is gone, and forgetting a domain (`stopped`, `release`): its state file
goes, and any lease it still records is released as the user that took it."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from xskbroker.client.libvirt.agent import BrokerAgent
from xskbroker.client.libvirt.config import Config
from xskbroker.client.libvirt.identity import Identity, same_process
from xskbroker.client.libvirt.metadata import Interface
from xskbroker.client.libvirt.monitors import make_monitor
from xskbroker.client.libvirt.state import Log, domain_file, read_state
from xskbroker.client.libvirt.worker import Terminated, run_worker
from xskbroker.common import safefiles
from xskbroker.wire import protocol as proto

RELEASE_TIMEOUT = 5.0  # the stopped/release hooks run synchronously: libvirt waits for them
STOP_WORKER_WAIT = 2.0
UNASKED = ("agent-failed", "connection-error", "broker-timeout")  # the broker could not be asked (agent.py)


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _worker_process(domain: str, interfaces: Sequence[Interface], cfg: Config, log_path: str,
                    state_path: str, uuid: str | None = None) -> None:
    """The detached worker's body: stdio to the log, no fd of libvirt's kept, then run_worker. Never returns."""
    code = 1
    try:
        out = safefiles.private_opener(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        # libvirt reads the hook's stdout and stderr until EOF: keeping any of its fds would block it
        os.closerange(3, 1 << 20)
        os.chdir("/")
        os.umask(0o077)
        stream = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
        sys.stdout = sys.stderr = stream
        signal.signal(signal.SIGTERM, _on_sigterm)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        log = Log(stream, domain)
        try:
            state = run_worker(domain, interfaces, cfg, make_monitor(cfg, domain, uuid), log, state_path)
            code = 0 if all(r["status"] == "attached" for r in state["interfaces"]) and not state.get("error") else 1
        except Terminated:
            log("terminated (the domain stopped)")
            code = 143
        except BaseException:
            log("worker failed:\n" + traceback.format_exc())
    finally:
        os._exit(code)


def spawn_worker(domain: str, interfaces: Sequence[Interface], cfg: Config, uuid: str | None = None) -> int:
    """Double fork: the worker runs in its own session, reparented away from libvirt; returns its pid. uuid: the
    domain's, by which virsh reaches it (see monitors.VirshMonitor)."""
    safefiles.private_dir(cfg.state_dir)  # ours alone: root writes here
    log_path = domain_file(cfg.state_dir, domain, ".log")
    state_path = domain_file(cfg.state_dir, domain, ".json")
    previous = read_state(state_path)
    if previous is not None:  # a previous start's, whose worker may still be waiting for a QEMU that is gone
        with open(log_path, "a", opener=safefiles.private_opener) as stream:
            _stop_worker(previous, Log(stream, domain))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_path)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setsid()
            worker = os.fork()
            if worker == 0:
                os.close(w)
                _worker_process(domain, interfaces, cfg, log_path, state_path, uuid)
            os.write(w, str(worker).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return int(data or 0)


def _stop_worker(state: Mapping[str, Any], log: Callable[[str], None]) -> None:
    pid, start = state.get("worker_pid"), state.get("worker_start")
    if not isinstance(pid, int) or not same_process(pid, start) or state.get("finished"):
        return
    log(f"worker {pid} is still running: ending it")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WORKER_WAIT
    while same_process(pid, start) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    if same_process(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def forget(domain: str, cfg: Config, operation: str = "release") -> dict[str, Any] | None:
    """Drop the domain's state file; release the leases it still records (as the user that took them).
    Returns the state that was forgotten, or None if there was none."""
    state_path = domain_file(cfg.state_dir, domain, ".json")
    state = read_state(state_path)
    if state is None:
        return None
    with open(domain_file(cfg.state_dir, domain, ".log"), "a", opener=safefiles.private_opener) as stream:
        log = Log(stream, domain)
        _stop_worker(state, log)
        state = read_state(state_path) or state  # the worker may have recorded more before it ended
        leases = [r["lease"] for r in state.get("interfaces", []) if r.get("lease") and not r.get("released")]
        ident = state.get("identity")
        if leases and isinstance(ident, dict):
            who = Identity(int(ident["uid"]), int(ident["gid"]), tuple(ident.get("groups", ())))
            with BrokerAgent(who, cfg.socket, min(cfg.timeout, RELEASE_TIMEOUT)) as agent:
                for i, lease in enumerate(leases):
                    try:
                        agent.release(lease)
                        log(f"{operation}: released lease {lease}")
                    except proto.BrokerError as e:
                        if e.code == "unknown-lease":
                            log(f"{operation}: lease {lease} had already ended (QEMU exited)")
                        else:
                            log(f"{operation}: could not release lease {lease}: {e.code}: {e.message}")
                        if e.code in UNASKED and leases[i + 1:]:
                            # libvirt waits for this hook: one timeout, not one per lease (they end with QEMU)
                            log(f"{operation}: not asked to release {', '.join(leases[i + 1:])}: the broker ends "
                                "them when it sees that QEMU has exited")
                            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_path)
        log(f"{operation}: state forgotten")
    return state
