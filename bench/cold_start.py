"""Cold start: under the shipped unit (bench/unit_start.py: systemd as PID 1 in a container, the goal's
figure), and without a sandbox: process start to READY=1 on a NOTIFY_SOCKET we own, the daemon's import
time, each against the bare interpreter's start-up measured in the same run."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import unit_start
from bench.common import ROOT_POLICY
from xskbroker.client.grant import request_fds
from xskbroker.testbed.sandbox import VethNamespace
from xskbroker.wire.protocol import Geometry

REPO = str(Path(__file__).resolve().parent.parent)
GEOMETRY = Geometry(umem_size=1 << 20)


def _interpreter_start() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return (time.perf_counter() - t) * 1000


def _import_time() -> float:
    code = ("import time; t = time.perf_counter(); import xskbroker.broker.daemon; "
            "print((time.perf_counter() - t) * 1000)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": REPO})
    return float(out.stdout)


def _to_ready(workdir: str) -> float:
    notify = os.path.join(workdir, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
        n.bind(notify)
        n.settimeout(10)
        env = {**os.environ, "PYTHONPATH": REPO, "NOTIFY_SOCKET": notify}
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "xskbroker.broker", "serve", "--socket", f"{workdir}/b.sock",
                                 "--policy", f"{workdir}/policy.toml", "--state-dir", workdir],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while b"READY=1" not in n.recv(4096):
                pass
            elapsed = (time.perf_counter() - t) * 1000
        finally:
            proc.terminate()
            proc.wait()
        os.unlink(notify)
    return elapsed


def _activated_first_grant(workdir: str, rounds: int) -> tuple[float, float]:
    """(first grant through systemd-socket-activate, the same grant against the then warm broker), ms.

    The first one pays the broker's start: interpreter, imports, policy, finding the XSK program."""
    first: list[float] = []
    warm: list[float] = []
    with VethNamespace(f"xskbench{os.getpid()}c", inside="xsk0", peer="xsk0p") as ns:
        for i in range(rounds):
            path = os.path.join(workdir, f"act{i}.sock")
            cmd = ["ip", "netns", "exec", ns.name, "systemd-socket-activate", "--seqpacket", "-l", path,
                   sys.executable, "-m", "xskbroker.broker", "serve", "--policy", f"{workdir}/policy.toml",
                   "--state-dir", workdir, "--socket", path]
            proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": REPO, "LIBXDP_SKIP_DISPATCHER": "1"},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 10
                while not os.path.exists(path):  # a launcher that died or never binds: an error, not a hang
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"systemd-socket-activate did not listen on {path} (exit {proc.poll()})")
                    time.sleep(0.001)
                time.sleep(0.05)  # bound before listening: a connect this instant could be refused
                for sample in (first, warm):
                    t = time.perf_counter()
                    _, fds = request_fds("xsk0", [0], kind="bound", geometry=GEOMETRY, socket_path=path)
                    sample.append((time.perf_counter() - t) * 1000)
                    for fd in fds:
                        os.close(fd)
                    time.sleep(0.05)  # the queue is released ~20 ms after its socket closed
            finally:
                proc.terminate()
                proc.wait()
    return statistics.median(first), statistics.median(warm)


def run(rounds: int = 15) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        Path(workdir, "policy.toml").write_text(ROOT_POLICY)
        base, ready, imports = [], [], []
        for _ in range(rounds):
            base.append(_interpreter_start())
            ready.append(_to_ready(workdir))
            imports.append(_import_time())
        first, warm = _activated_first_grant(workdir, min(rounds, 8))
    b, r = statistics.median(base), statistics.median(ready)
    return {"interpreter_start_ms": b, "start_to_ready_ms": r, "ready_over_interpreter": r / b,
            "import_ms": statistics.median(imports), "activation_to_first_grant_ms": first,
            "warm_grant_ms": warm, "first_over_warm": first / warm, "unit": unit_start.run()}
