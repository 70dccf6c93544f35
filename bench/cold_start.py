"""Cold start: process start to READY=1 on a NOTIFY_SOCKET we own, and the daemon's import time, each
against the bare interpreter's start-up measured in the same run."""

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

from bench.common import ROOT_POLICY

REPO = str(Path(__file__).resolve().parent.parent)


def _interpreter_start() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return (time.perf_counter() - t) * 1000


def _import_time() -> float:
    code = "import time; t = time.perf_counter(); import broker.daemon; print((time.perf_counter() - t) * 1000)"
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
        proc = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--socket", f"{workdir}/b.sock",
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


def run(rounds: int = 15) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        Path(workdir, "policy.toml").write_text(ROOT_POLICY)
        base, ready, imports = [], [], []
        for _ in range(rounds):
            base.append(_interpreter_start())
            ready.append(_to_ready(workdir))
            imports.append(_import_time())
    b, r = statistics.median(base), statistics.median(ready)
    return {"interpreter_start_ms": b, "start_to_ready_ms": r, "ready_over_interpreter": r / b,
            "import_ms": statistics.median(imports)}
