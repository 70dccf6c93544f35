"""Cold start under the real unit: socket activation to first grant with the shipped xskbroker.service
and .socket, systemd 252 as PID 1 (the container of tests/integration/test_systemd_pid1.py), and where
the time goes.

The shipped units are installed unchanged by deploy/install.sh. A client inside the container (its
imports done beforehand) stops the service, then times a bound 1 MiB grant from its connect to the fds
in hand; systemd's own timestamps (same CLOCK_MONOTONIC) split that into connect->fork,
fork->READY=1 and READY=1->grant. fork->READY=1 is split further by probe units: a copy of the shipped
unit with every sandbox setting, Type=oneshot and ExecStart= replaced, and the same without the
sandbox, each running /bin/true, `python3 -c pass` and the daemon's imports. The differences give
the sandbox's set-up, the interpreter's start and the imports; `python3 -X importtime` inside says
which imports.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

from xskbroker.testbed import container
from xskbroker.testbed.container import OPT, SRC, Container

ROOT = Path(__file__).resolve().parent.parent
UNIT = "xskbroker.service"
POLICY = """\
version = 1

[[allow]]
name = "bench"
users = [0]
interfaces = ["xsk*"]
kinds = ["bound"]
"""
PY = "/usr/bin/python3"
IMPORTS = f"import sys; sys.path.insert(0, {OPT + '/lib'!r}); import xskbroker.broker.cli, xskbroker.broker.daemon"
PROBES = {"true": "/bin/true", "python": f"{PY} -c pass", "imports": f'{PY} -c "{IMPORTS}"'}

# Runs inside the container as root: N rounds of stop, activate, grant; one JSON line out. The broker's
# own audit records (JSON lines on stderr, stamped by journald) say when it was ready and when it granted:
# systemd's ActiveEnterTimestamp is when PID 1 got round to READY=1, which under load is after the grant.
CLIENT = """
import json, os, subprocess, sys, time
sys.path.insert(0, %(lib)r)
from xskbroker.client.grant import request_fds
from xskbroker.wire.protocol import Geometry

def show(*props):
    out = subprocess.run(["systemctl", "show", %(unit)r, *("-p" + p for p in props)],
                         capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split("=", 1) for line in out.split())}

def records(cursor):
    # when journald got the broker's first record of each event (monotonic: the realtime clock may be stepped)
    out = subprocess.run(["journalctl", "-u", %(unit)r, "-o", "json", "--no-pager", "--after-cursor", cursor],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        entry = json.loads(line)
        event = entry.get("XSKBROKER_EVENT")  # a native entry; a JSON line (--audit json) carries it in MESSAGE
        if event is None and isinstance(entry.get("MESSAGE"), str) and entry["MESSAGE"].startswith("{"):
            event = json.loads(entry["MESSAGE"]).get("event")
        if event is not None:
            found.setdefault(event, int(entry["__MONOTONIC_TIMESTAMP"]) / 1e6)
    return found

def schedstat(pid):
    # on-CPU and run-queue wait (ns) of all the broker's threads since systemd forked it: the sandbox's
    # set-up happens in that same task before the exec, so it is in both
    run = wait = 0
    for task in os.listdir("/proc/%%d/task" %% pid):
        with open("/proc/%%d/task/%%s/schedstat" %% (pid, task)) as f:
            a, b, _ = f.read().split()
        run, wait = run + int(a), wait + int(b)
    return run / 1e6, wait / 1e6

def cursor():
    out = subprocess.run(["journalctl", "-n", "0", "--show-cursor", "--no-pager"], capture_output=True, text=True,
                         check=True).stdout
    return out.strip().rsplit("cursor: ", 1)[1]

rounds = []
for i in range(%(rounds)d):
    subprocess.run(["systemctl", "stop", %(unit)r], check=True)
    time.sleep(0.3)
    mark = cursor()
    t0 = time.monotonic()
    reply, fds = request_fds("xsk0", [0], kind="bound", geometry=Geometry(umem_size=1 << 20))
    t1 = time.monotonic()
    cpu, waited = schedstat(show("MainPID")["MainPID"])
    for fd in fds:
        os.close(fd)
    fork = show("ExecMainStartTimestampMonotonic")["ExecMainStartTimestampMonotonic"] / 1e6
    time.sleep(0.1)  # journald has the records
    rec = records(mark)
    ready, grant = rec["ready"], rec["grant"]
    ms = lambda a, b: round((b - a) * 1000, 3)
    rounds.append({"total_ms": ms(t0, t1), "connect_to_fork_ms": ms(t0, fork), "fork_to_ready_ms": ms(fork, ready),
                   "ready_to_granted_ms": ms(ready, grant), "granted_to_fds_ms": ms(grant, t1),
                   "broker_cpu_ms": round(cpu, 3), "broker_run_delay_ms": round(waited, 3)})
print(json.dumps(rounds))
"""

# Settings a probe unit does not take from the shipped one: what makes it a notify service of that socket.
NOT_SANDBOX = re.compile(r"^(Type|ExecStart|ExecReload|Restart|RestartSec|WatchdogSec|TimeoutAbortSec|Requires|After"
                         r"|Also|WantedBy|StartLimit\w+)=")


def probe_unit(shipped: str, command: str, sandboxed: bool) -> str:
    """A oneshot unit running COMMAND, with every other [Service] setting of SHIPPED when SANDBOXED."""
    # RemainAfterExit=: an inactive unit nothing refers to is unloaded at once, its timestamps with it
    lines = ["[Service]", "Type=oneshot", "RemainAfterExit=yes", f"ExecStart={command}"]
    if sandboxed:
        section = ""
        for line in shipped.splitlines():
            if line.startswith("["):
                section = line
            elif section == "[Service]" and line and not line.startswith("#") and not NOT_SANDBOX.match(line):
                lines.append(line)
    return "\n".join(lines) + "\n"


def _client(rounds: int) -> str:
    return CLIENT % {"lib": OPT + "/lib", "unit": UNIT, "rounds": rounds}


def _put(box: Container, path: str, text: str) -> None:
    box.run("install", "-D", "-m", "0644", "/dev/stdin", path, input=text)


def _setup(box: Container) -> str:
    box.run("sh", f"{SRC}/deploy/install.sh", "--bindir", f"{OPT}/bin", "--quiet")
    box.host_ip("link", "add", "xsk0", "type", "veth", "peer", "name", "xsk0p")
    box.host_ip("link", "set", "xsk0", "up")
    box.host_ip("link", "set", "xsk0p", "up")
    _put(box, "/etc/xskbroker/policy.toml", POLICY)
    box.systemctl("daemon-reload")
    box.systemctl("enable", "--now", "xskbroker.socket")
    return box.run("systemctl", "cat", UNIT).stdout


def _probe(box: Container, unit: str, rounds: int) -> float:
    """Fastest fork->exit of UNIT (a oneshot), ms: differences of two probes' minima are what holds up on a
    loaded machine, where medians swing by tens of ms."""
    runs = []
    for _ in range(rounds):
        box.systemctl("start", unit)
        out = box.systemctl("show", unit, "-p", "ExecMainStartTimestampMonotonic",
                            "-p", "ExecMainExitTimestampMonotonic").stdout
        box.systemctl("stop", unit)
        ts = {k: int(v) for k, v in (line.split("=", 1) for line in out.split())}
        runs.append((ts["ExecMainExitTimestampMonotonic"] - ts["ExecMainStartTimestampMonotonic"]) / 1000)
    return min(runs)


def _importtime(box: Container, client: str, top: int = 15) -> tuple[float, list[tuple[str, float]]]:
    """One more activation with PYTHONPROFILEIMPORTTIME=1 in the unit: every import the broker made up to
    its first grant (total ms) and the slowest TOP by cumulative time, from its stderr in the journal."""
    dropin = f"/run/systemd/system/{UNIT}.d/importtime.conf"
    _put(box, dropin, "[Service]\nEnvironment=PYTHONPROFILEIMPORTTIME=1\n")
    box.systemctl("daemon-reload")
    since = box.run("date", "+%s.%N").stdout.strip()
    box.run(PY, "-c", client, timeout=60)
    text = box.run("journalctl", "-u", UNIT, "--since", f"@{since}", "-o", "cat", "--no-pager").stdout
    box.run("rm", dropin)
    box.systemctl("daemon-reload")
    rows, total = [], 0
    for line in text.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            rows.append((m.group(3), int(m.group(1)) / 1000))
            total += int(m.group(1)) if not m.group(2) else 0
    return total / 1000, sorted(rows, key=lambda r: -r[1])[:top]


def run(rounds: int = 15) -> dict[str, Any]:
    missing = container.host_missing()
    if missing:
        return {"skipped": missing}
    with tempfile.TemporaryDirectory(prefix="xc-cold-") as tmp, \
            container.booted(ROOT, Path(tmp), f"xc-cold-{os.getpid()}") as box:
        shipped = _setup(box)
        samples = json.loads(box.run(PY, "-c", _client(rounds), timeout=120).stdout)
        probes: dict[str, float] = {}
        for name, command in PROBES.items():
            for sandboxed in (True, False):
                unit = f"xcprobe-{name}-{'sandboxed' if sandboxed else 'bare'}.service"
                _put(box, f"/etc/systemd/system/{unit}", probe_unit(shipped, command, sandboxed))
        box.systemctl("daemon-reload")
        for name in PROBES:
            for kind in ("sandboxed", "bare"):
                probes[f"{name}_{kind}_ms"] = _probe(box, f"xcprobe-{name}-{kind}.service", rounds)
        import_total, profile = _importtime(box, _client(1))
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    return {
        **med,
        "total_min_ms": min(s["total_ms"] for s in samples),
        # what the first grant would take with the CPUs to itself: the wall time less the broker's wait for a CPU
        "total_less_run_delay_ms": statistics.median(s["total_ms"] - s["broker_run_delay_ms"] for s in samples),
        "rounds": samples,
        "probes": probes,
        # the breakdown of fork->READY=1, each a difference of two probes' minima
        "sandbox_setup_ms": probes["true_sandboxed_ms"] - probes["true_bare_ms"],
        "interpreter_start_ms": probes["python_sandboxed_ms"] - probes["true_sandboxed_ms"],
        "imports_ms": probes["imports_sandboxed_ms"] - probes["python_sandboxed_ms"],
        "imports_to_first_grant_ms": import_total,  # with -X importtime's own overhead
        "importtime_top": profile,
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
