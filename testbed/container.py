"""A real systemd as PID 1 for the tests: a cached Debian tree booted with systemd-nspawn.

The tree (debootstrap, minbase, plus what the broker needs) is built once per machine under
/var/cache/xskbroker-test, keyed by what goes into it, so a fresh machine pays for it once and later
runs reuse it. Each boot mounts it read-only under a tmpfs overlay (--volatile=overlay): nothing a
test does reaches the cache. The container has no network; the project comes in from the host as an
unpacked wheel, the units through deploy/install.sh run inside.

The host need not run systemd: nspawn is started in a cgroup of its own (cgroup v2) and kept there
(--keep-unit --register=no), and commands run inside through nsenter, which needs no machined.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

SUITE = "bookworm"
# systemd is PID 1; python3 runs the broker; libxdp1/libbpf1 are what the broker loads.
INCLUDE = ("systemd", "python3", "libxdp1", "libbpf1")
# Change it when the way the tree is made changes: the old tree is then left alone and a new one built.
RECIPE = "1"
CACHE = Path(os.environ.get("XSKBROKER_TEST_CACHE", "/var/cache/xskbroker-test"))
CGROUP2 = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() \
    else Path("/sys/fs/cgroup")
# Where the project and its deploy files appear inside the container.
OPT = "/opt/xskbroker"
SRC = "/opt/xskbroker-src"


class Unavailable(Exception):
    """This host lacks something the container needs (the message says what)."""


def tree_key() -> str:
    return hashlib.sha256(f"{SUITE} minbase {','.join(INCLUDE)} {RECIPE}".encode()).hexdigest()[:12]


def tree_path() -> Path:
    return CACHE / f"{SUITE}-minbase-{tree_key()}"


def debian_mirror(sources: Sequence[Path] | None = None) -> str:
    """The Debian mirror apt already uses for SUITE (one-line and deb822 sources), never a name of our own."""
    if sources is None:
        d = Path("/etc/apt")
        sources = [d / "sources.list", *sorted((d / "sources.list.d").glob("*.list")),
                   *sorted((d / "sources.list.d").glob("*.sources"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split() \
                        and "main" in fields.get("Components", "").split():
                    return str(fields["URIs"].split()[0])
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE and "main" in words[3:]:
                    return words[1]
    raise Unavailable(f"no apt source for Debian {SUITE} main in /etc/apt: the container tree cannot be built")


def build_tree(log: Path | None = None) -> Path:
    """The cached tree, built now if it is not there yet (under a lock: parallel runs build it once)."""
    tree = tree_path()
    if (tree / "usr/lib/systemd/systemd").exists():
        return tree
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.path.exists(debootstrap):
        raise Unavailable("debootstrap is not installed (apt-get install debootstrap)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (tree / "usr/lib/systemd/systemd").exists():
            return tree
        work = Path(tempfile.mkdtemp(prefix=f".{tree.name}.", dir=CACHE))
        try:
            out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
            try:
                subprocess.run([debootstrap, "--variant=minbase", f"--include={','.join(INCLUDE)}",
                                SUITE, str(work), debian_mirror()],
                               stdout=out, stderr=subprocess.STDOUT, check=True)
            finally:
                if log:
                    out.close()  # type: ignore[union-attr]
            _trim(work)
            work.rename(tree)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return tree


def _trim(tree: Path) -> None:
    """Drop what a boot never needs, and what would make every boot slower or noisier."""
    for deb in (tree / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    # one machine id per boot (empty file: systemd makes a transient one)
    (tree / "etc/machine-id").write_text("")
    # no login prompt on the console, nothing waits for a network
    for unit in ("console-getty.service", "getty@.service", "systemd-networkd-wait-online.service",
                 "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer"):
        link = tree / "etc/systemd/system" / unit
        with contextlib.suppress(FileExistsError):
            link.symlink_to("/dev/null")


def stage_project(root: Path, stage: Path) -> None:
    """What the container gets from the host, under STAGE: opt/ (the wheel, unpacked, and the command)
    and src/ (deploy/ and docs/, what install.sh reads). The wheel is the host's build of this clone."""
    wheels = stage / "wheel"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(wheels), str(root)], capture_output=True, text=True, timeout=300, check=False)
    if done.returncode:
        raise RuntimeError(f"pip wheel failed:\n{done.stderr}")
    (wheel,) = wheels.glob("xskbroker-*.whl")
    lib = stage / "opt/lib"
    zipfile.ZipFile(wheel).extractall(lib)
    # byte-code now, as pip's install would: the unit's ProtectSystem=strict makes the tree read-only, so
    # without it every start compiles every module again (~150 ms). Debian's python3 (same suite as the
    # container's) writes the cpython-3XX files the container's interpreter reads.
    subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", str(lib)], check=True, timeout=300)
    bindir = stage / "opt/bin"
    bindir.mkdir(parents=True)
    # what pip's console script would be, for Debian's python3 with the unpacked wheel on its path
    command = bindir / "xskbroker"
    command.write_text(f"#!/usr/bin/python3\nimport sys\nsys.path.insert(0, {OPT + '/lib'!r})\n"
                       "from xskbroker.broker.cli import main\nsys.exit(main())\n")
    command.chmod(0o755)
    for sub in ("deploy", "docs"):
        shutil.copytree(root / sub, stage / "src" / sub, symlinks=True)
    # readable by every user inside, whatever the clone's or the temp dir's modes were
    for dirpath, _dirnames, filenames in os.walk(stage):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            p = os.path.join(dirpath, f)
            os.chmod(p, os.stat(p).st_mode | 0o444)


def host_missing() -> str | None:
    """What this host lacks to boot the container, or None. Only real host features count here."""
    if os.geteuid() != 0:
        return "booting a container needs root"
    if not shutil.which("systemd-nspawn"):
        return "systemd-nspawn is not installed (apt-get install systemd-container)"
    if not (CGROUP2 / "cgroup.procs").exists():
        return f"no cgroup v2 hierarchy at {CGROUP2}"
    if not Path("/proc/filesystems").read_text().count("overlay"):
        return "the kernel has no overlayfs (nspawn --volatile=overlay)"
    return None


class Container:
    """systemd booted as PID 1 from TREE, with STAGE's opt/ and src/ bound read-only at OPT and SRC.

    Its writes go to a tmpfs overlay; its network is private (only lo until a test adds links with
    host_ip()). Leaving the block kills whatever is left of it and removes its cgroup.
    """

    def __init__(self, tree: Path, stage: Path, name: str, log: Path) -> None:
        self.tree, self.stage, self.name, self.log_path = tree, stage, name, log
        self.cgroup = CGROUP2 / name
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.boot_seconds = 0.0

    def __enter__(self) -> Container:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> None:
        t0 = time.monotonic()
        self._remove_cgroup(5.0)  # a leftover of a run that was killed before it could clean up
        self.cgroup.mkdir()
        argv = ["systemd-nspawn", "--quiet", "-D", str(self.tree), "--volatile=overlay", "--boot",
                "--register=no", "--keep-unit", "--private-network", "--system-call-filter=bpf",
                f"--machine={self.name}", "--console=pipe", "--link-journal=no",
                f"--bind-ro={self.stage}/opt:{OPT}", f"--bind-ro={self.stage}/src:{SRC}"]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        # the host has no systemd to make a scope: nspawn joins its own cgroup before it starts
        wrapper = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.cgroup), *argv]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(wrapper, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no container init after {timeout:.0f} s:\n{self.log()}")
            self.leader = self._find_leader()
            time.sleep(0.05)
        while True:
            done = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout)
            state = done.stdout.strip()
            if state in ("running", "degraded"):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"container did not boot (state {state!r}): {done.stderr}\n{self.log()}")
            time.sleep(0.2)
        self.boot_seconds = time.monotonic() - t0

    def _find_leader(self) -> int:
        """The container's PID 1 seen from here: a process in our cgroup tree that is pid 1 of its namespace."""
        for procs in self.cgroup.rglob("cgroup.procs"):
            for line in procs.read_text().split():
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{line}/status").read_text()
                    m = re.search(r"^NSpid:\s+(.*)$", status, re.M)
                    if m and m.group(1).split()[-1] == "1" and len(m.group(1).split()) > 1:
                        return int(line)
        return 0

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-8000:]
        return ""

    def run(self, *argv: str, check: bool = True, timeout: float = 60.0, input: str | None = None,
            user: str | None = None) -> subprocess.CompletedProcess[str]:
        """ARGV inside the container (its namespaces, its root, its PATH), as root or as USER (runuser:
        the user's own groups, as a login would give them)."""
        if user:
            argv = ("runuser", "-u", user, "--", *argv)
        cmd = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w", "--", *argv]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "TERM": "dumb"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, env=env,
                              check=False)
        if check and done.returncode:
            raise RuntimeError(f"in {self.name}: {' '.join(argv)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", unit, "-p", prop, "--value").stdout.strip()

    def host_ip(self, *args: str) -> None:
        """The host's `ip` in the container's network namespace (the container needs no iproute2)."""
        done = subprocess.run(["nsenter", "-t", str(self.leader), "-n", "ip", *args], capture_output=True,
                              text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"ip {' '.join(args)} in {self.name}: {done.stderr.strip()}")

    def _kill_all(self) -> None:
        """SIGKILL to everything left in the cgroup tree (cgroup.kill where the kernel has it)."""
        if not self.cgroup.exists():
            return
        with contextlib.suppress(OSError):
            (self.cgroup / "cgroup.kill").write_text("1")
            return
        for procs in self.cgroup.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        """Power off if it still can, then kill whatever is left in its cgroup and remove the cgroup."""
        if self.proc is not None and self.proc.poll() is None:
            if self.leader:
                # nspawn forwards SIGTERM as "halt" to the container's init
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout if self.leader else 0.1)
        self._kill_all()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self._remove_cgroup(timeout)
        # nspawn leaves its propagation directory where /run is not a tmpfs
        with contextlib.suppress(OSError):
            Path("/run/systemd/nspawn/propagate", self.name).rmdir()

    def _remove_cgroup(self, timeout: float) -> None:
        """The cgroup and the groups the container's systemd made inside it, deepest first."""
        deadline = time.monotonic() + timeout
        while self.cgroup.exists():
            try:
                for d in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    d.rmdir()
                self.cgroup.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                self._kill_all()
                time.sleep(0.05)


@contextlib.contextmanager
def booted(root: Path, workdir: Path, name: str) -> Iterator[Container]:
    """Build (or reuse) the tree, stage this clone, boot: the whole fixture in one block."""
    tree = build_tree(workdir / "debootstrap.log")
    stage = workdir / "stage"
    stage_project(root, stage)
    with Container(tree, stage, name, workdir / "console.log") as box:
        yield box
