"""`xskbroker doctor`: what this host can do for the broker, and how to fix what it cannot.

Every check looks and changes nothing (see doctor_probes). Each says what it found, a status and, unless all is
well, the fix in one sentence. The worst status is the verdict and the exit code: 0 ready, 1 degraded (works
with limits), 2 unusable. A check this user cannot make ("unknown") counts for nothing: run as an unprivileged
user, doctor says what it could not see rather than calling it a failure.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

from xskbroker.broker import doctor_probes as probe
from xskbroker.broker import lastgood, netdev, xsk
from xskbroker.common.records import field, record

OK, DEGRADED, UNUSABLE, UNKNOWN = "ok", "degraded", "unusable", "unknown"
RANK = {UNKNOWN: 0, OK: 0, DEGRADED: 1, UNUSABLE: 2}
VERDICTS = {0: "ready", 1: "degraded", 2: "unusable"}
QEMU_MEMLOCK_PER_QUEUE = 32 << 20  # what QEMU registers per queue for a bare grant (docs/qemu.md)
# drivers with native XDP, for kernels whose netdev family cannot say (< 6.3)
NATIVE_XDP_DRIVERS = frozenset({"veth", "virtio_net", "tun", "ixgbe", "ixgbevf", "i40e", "ice", "igb", "igc",
                                "mlx4_en", "mlx5_core", "bnxt_en", "ena", "nfp", "qede", "sfc", "stmmac",
                                "netdevsim", "fec", "mvneta", "mvpp2", "gve", "idpf", "hv_netvsc"})


@record
class Check:
    name: str
    status: str
    found: str
    fix: str = ""
    facts: dict[str, Any] = field(default_factory=dict)


def verdict(checks: Iterable[Check]) -> tuple[str, int]:
    """("ready" | "degraded" | "unusable", exit code) from the worst status; unknown counts as nothing."""
    worst = max((RANK[c.status] for c in checks), default=0)
    return VERDICTS[worst], worst


def mib(value: int | None) -> str:
    if value is None:
        return "unlimited"
    return f"{value >> 20} MiB" if value % (1 << 20) == 0 else f"{value} bytes"


def _guard(name: str, fn: Callable[[], Check]) -> Check:
    """A probe that fails unexpectedly is reported as such; it never stops the other checks."""
    try:
        return fn()
    except Exception as e:
        return Check(name, UNKNOWN, f"could not check: {type(e).__name__}: {e}")


# ---- kernel
def check_af_xdp() -> Check:
    err = probe.af_xdp()
    if not err:
        return Check("kernel.af_xdp", OK, "AF_XDP sockets can be made")
    if err in (errno.EPERM, errno.EACCES) and probe.CAP_NET_RAW not in probe.effective_caps():
        return Check("kernel.af_xdp", UNKNOWN, "making an AF_XDP socket needs CAP_NET_RAW: run doctor as root to see")
    return Check("kernel.af_xdp", UNUSABLE, f"no AF_XDP socket: {os.strerror(err)}",
                 "use a kernel built with CONFIG_XDP_SOCKETS=y, and let a container's seccomp filter or "
                 "RestrictAddressFamilies= allow AF_XDP", {"errno": err})


def check_bindtodevice() -> Check:
    release = os.uname().release
    if xsk.kernel_enforces_bindtodevice():
        return Check("kernel.bindtodevice", OK, f"SO_BINDTODEVICE confines AF_XDP binds (Linux {release}): "
                     "bare grants are possible")
    return Check("kernel.bindtodevice", DEGRADED, f"Linux {release} does not confine an AF_XDP bind to the "
                 "SO_BINDTODEVICE device: the broker refuses bare grants (QEMU sock-fds=)",
                 "run Linux 6.5 or later for bare grants; bound grants work as they are")


def check_sockets() -> list[Check]:
    f = probe.socket_features()
    out = []
    if f["peerpidfd"]:
        out.append(Check("kernel.peerpidfd", OK, "SO_PEERPIDFD names each client race-free"))
    else:
        out.append(Check("kernel.peerpidfd", DEGRADED if f["peerpidfd"] is False else UNKNOWN,
                         "no SO_PEERPIDFD: a client's start time is not proven, so its leases are never "
                         "signalled (revoke --signal) and a restart cannot recognise their holders",
                         "run Linux 6.5 or later"))
    if f["passrights"]:
        out.append(Check("kernel.passrights", OK, "SO_PASSRIGHTS refuses fds clients send, at the socket"))
    else:
        out.append(Check("kernel.passrights", OK, "no SO_PASSRIGHTS (before Linux 6.16): fds a client sends "
                         "reach the broker, which closes them unread", "none needed; Linux 6.16 refuses them "
                         "at the socket"))
    if f["pidfs"]:
        out.append(Check("kernel.pidfs", OK, "pidfds live on pidfs: a lease holder is named by an inode unique "
                         "for the boot"))
    else:
        out.append(Check("kernel.pidfs", OK, "pidfds are not on pidfs (before Linux 6.9): lease holders are "
                         "named by pid and start time (10 ms apart)", "none needed; Linux 6.9 adds pidfs"))
    return out


def check_bpf() -> Check:
    caps = probe.effective_caps()
    privileged = bool(caps & {probe.CAP_BPF, probe.CAP_SYS_ADMIN})
    try:
        probe.bpf_map_create()
        probe.bpf_prog_load()
    except OSError as e:
        if e.errno == errno.ENOSYS:
            return Check("bpf", UNUSABLE, "this kernel has no bpf() system call",
                         "use a kernel with CONFIG_BPF_SYSCALL=y")
        if not privileged:
            return Check("bpf", UNKNOWN, f"bpf() needs CAP_BPF or CAP_SYS_ADMIN, which this user lacks "
                         f"({e.strerror}): run doctor as root to see whether it is allowed")
        why = []
        if probe.seccomp_mode() == 2:
            why.append("a seccomp filter is active on this process (a container's profile?)")
        mode = probe.lockdown()
        if mode and mode != "none":
            why.append(f"kernel lockdown is {mode}")
        return Check("bpf", UNUSABLE, f"bpf() is refused ({e.strerror}) although this process holds CAP_BPF/"
                     f"CAP_SYS_ADMIN{': ' + '; '.join(why) if why else ''}: the broker cannot attach its "
                     "XSK program (grants fail with xdp-attach-failed)",
                     "allow bpf(2) where the broker runs (systemd-nspawn --system-call-filter=bpf, docker "
                     "--security-opt seccomp=..., or boot without lockdown)", {"errno": e.errno})
    return Check("bpf", OK, "bpf() is allowed: a map was made and an XDP program loaded (neither attached; "
                 "both closed at once)")


def check_libraries() -> list[Check]:
    libs = probe.libraries()
    out = []
    if "libbpf_error" in libs or "libxdp_error" in libs:
        out.append(Check("libs", UNUSABLE, "; ".join(str(libs[k]) for k in ("libbpf_error", "libxdp_error")
                                                     if k in libs), "install libxdp1 and libbpf1 (apt-get install "
                         "libxdp1 libbpf1)", libs))
        return out
    out.append(Check("libs", OK, f"libbpf {libs.get('libbpf_version') or '?'} ({libs.get('libbpf')}), libxdp "
                     f"{libs.get('libxdp_version') or '?'} ({libs.get('libxdp')})", facts=libs))
    path, err = probe.xsk_object()
    if err:
        out.append(Check("xsk_program", UNUSABLE, f"libxdp cannot open its XSK program object: {err}",
                         "install libxdp's BPF objects (xsk_def_xdp_prog.o, in the libxdp1 package) or point "
                         "LIBXDP_OBJECT_PATH at them", {"path": path}))
    else:
        out.append(Check("xsk_program", OK, f"libxdp finds its XSK program object ({path or 'xsk_def_xdp_prog.o'})",
                         facts={"path": path}))
    return out


# ---- memlock
def _manager() -> probe.ProcessLimits:
    """Who starts xskbroker.service: PID 1 when it is systemd, else (no systemd here) this process stands in."""
    try:
        pid1 = probe.process_limits(1)
        if pid1.comm == "systemd":
            return pid1
    except OSError:
        pass
    return probe.process_limits()


def check_broker_memlock(broker: probe.ProcessLimits | None) -> Check:
    name = "memlock.broker"
    if broker is not None:
        who = f"the running broker (pid {broker.pid})"
        facts: dict[str, Any] = {"pid": broker.pid, "soft": broker.soft, "hard": broker.hard,
                                 "ipc_lock": broker.ipc_lock, "sys_resource": broker.sys_resource}
        found = f"{who}: memlock {mib(broker.soft)} soft / {mib(broker.hard)} hard, " + (
            "CAP_IPC_LOCK (pins without limit)" if broker.ipc_lock else "no CAP_IPC_LOCK")
        if broker.ipc_lock or broker.soft is None:
            return Check(name, OK, found + ": bound grants' UMEM is not capped", facts=facts)
        return Check(name, DEGRADED, found + f": bound grants may pin only {mib(broker.soft)} of UMEM in all",
                     "LimitMEMLOCK=infinity in xskbroker.service, which needs a manager whose own hard limit is "
                     "unlimited (or CAP_SYS_RESOURCE); or give the unit CAP_IPC_LOCK in a drop-in", facts)
    if os.geteuid() != 0:
        return Check(name, UNKNOWN, "no broker answers, and a broker's limits are its own: run doctor as root, or "
                     "with a broker running, to see them")
    here, mgr = probe.process_limits(), _manager()
    facts = {"soft": here.soft, "hard": here.hard, "ipc_lock": here.ipc_lock,
                             "sys_resource": here.sys_resource, "manager": mgr.comm, "manager_hard": mgr.hard,
                             "manager_sys_resource": mgr.sys_resource}
    found = (f"no broker answers; here: memlock {mib(here.soft)} soft / {mib(here.hard)} hard, "
             f"{'' if here.ipc_lock else 'no '}CAP_IPC_LOCK, {'' if here.sys_resource else 'no '}CAP_SYS_RESOURCE")
    # the unit keeps no CAP_IPC_LOCK: it relies on LimitMEMLOCK=infinity, which the manager can only give up to
    # its own hard limit unless it holds CAP_SYS_RESOURCE
    unit_limit = None if mgr.hard is None or mgr.sys_resource else mgr.hard
    facts["unit_memlock"] = unit_limit
    serve_here = "`serve` started here pins without limit (CAP_IPC_LOCK)" if here.ipc_lock or here.soft is None \
        else f"`serve` started here may pin only {mib(here.soft)}"
    if unit_limit is None:
        return Check(name, OK, f"{found}; {serve_here}; xskbroker.service gets LimitMEMLOCK=infinity", facts=facts)
    mgr_name = "PID 1 (systemd)" if mgr.comm == "systemd" else "whatever starts it here"
    return Check(name, DEGRADED, f"{found}; {serve_here}, but under xskbroker.service (no CAP_IPC_LOCK) "
                 f"LimitMEMLOCK=infinity becomes {mib(unit_limit)} ({mgr_name} has that hard limit and no "
                 "CAP_SYS_RESOURCE to lift it): bound grants past it fail with ENOBUFS",
                 "lift the memlock hard limit of the service manager (a container's: systemd-nspawn "
                 "--rlimit=RLIMIT_MEMLOCK=infinity, or prlimit --memlock=unlimited on its PID 1 from the host), or "
                 "give xskbroker.service CAP_IPC_LOCK in a drop-in", facts)


def check_consumer_memlock(broker: probe.ProcessLimits | None) -> Check:
    name = "memlock.consumer"
    here = probe.process_limits()
    conf, default = probe.limits_conf_memlock(), probe.systemd_default_memlock()
    can_raise = (broker or here).sys_resource
    facts: dict[str, Any] = {"soft": here.soft, "hard": here.hard, "limits_conf": conf,
                             "systemd_default": default, "broker_can_raise": can_raise}
    found = (f"a consumer started like this process gets memlock {mib(here.soft)} soft / {mib(here.hard)} hard "
             f"(limits.conf: {', '.join(conf) or 'no memlock line'}; systemd DefaultLimitMEMLOCK="
             f"{default or 'its built-in 8M'}); bound grants charge the broker, but a bare grant's holder "
             f"(QEMU) registers {mib(QEMU_MEMLOCK_PER_QUEUE)} per queue itself")
    if here.soft is None or here.soft >= QEMU_MEMLOCK_PER_QUEUE:
        return Check(name, OK, found, facts=facts)
    who = "the running broker" if broker else "a broker started here"
    if broker is None and os.geteuid() != 0:
        return Check(name, DEGRADED, found + "; whether the broker may raise it (CAP_SYS_RESOURCE and a rule's "
                     "raise_memlock) is unknown: no broker answers", "give consumers more (LimitMEMLOCK= in their "
                     "unit, a memlock line in /etc/security/limits.conf), or ask the administrator for "
                     "raise_memlock", facts)
    if can_raise:
        return Check(name, OK, found + f"; {who} has CAP_SYS_RESOURCE and raises it where a rule's "
                     "raise_memlock allows", facts=facts)
    root_too = " (root itself lacks it on this host: its bounding set)" if not here.sys_resource_bound else ""
    return Check(name, DEGRADED, found + f"; {who} lacks CAP_SYS_RESOURCE{root_too}, so raise_memlock cannot "
                 "raise it: QEMU's UMEM registration for a bare grant fails with ENOBUFS",
                 "give consumers more (LimitMEMLOCK= in their unit, a memlock line in /etc/security/limits.conf, "
                 "prlimit as root), or give the broker CAP_SYS_RESOURCE (docs/systemd.md drop-in) and the rule "
                 "raise_memlock", facts)


# ---- interfaces
def check_interface(ifindex: int, name: str, named: bool) -> list[Check]:
    base = f"iface.{name}"
    out = [_guard(f"{base}.queues", lambda: Check(f"{base}.queues", OK,
                                                  f"{probe.queue_count(name)} queue(s) (ethtool channels)",
                                                  facts={"queues": probe.queue_count(name)}))]
    drv = probe.driver(name)
    feats = probe.xdp_features(ifindex)
    facts: dict[str, Any] = {"driver": drv}
    if feats is not None:
        native, how = feats.basic, "the netdev family's xdp-features"
        facts.update(native=feats.basic, zerocopy=feats.zerocopy, zc_max_segs=feats.zc_max_segs)
    else:
        native, how = drv in NATIVE_XDP_DRIVERS, "the driver's name (this kernel has no netdev family)"
        facts.update(native=native, zerocopy=None)
    if native:
        out.append(Check(f"{base}.xdp", OK, f"driver {drv}: native XDP (from {how})", facts=facts))
    else:
        out.append(Check(f"{base}.xdp", DEGRADED, f"driver {drv}: no native XDP (from {how}): the XSK program "
                         "runs in skb (generic) mode, slower", "use a NIC whose driver has native XDP for speed; "
                         "skb mode works as it is", facts))
    if feats is None:
        out.append(Check(f"{base}.zerocopy", UNKNOWN, "this kernel cannot say whether the driver has AF_XDP "
                         "zero-copy (netdev family from Linux 6.3)", facts=facts))
    elif feats.zerocopy:
        out.append(Check(f"{base}.zerocopy", OK, f"AF_XDP zero-copy (up to {feats.zc_max_segs} segments)",
                         facts=facts))
    else:
        out.append(Check(f"{base}.zerocopy", DEGRADED, f"driver {drv}: no AF_XDP zero-copy: sockets bind in copy "
                         "mode (every frame is copied)", "use a NIC whose driver has AF_XDP zero-copy (ice, i40e, "
                         "mlx5_core, ...) for speed; copy mode works as it is", facts))
    out.append(_guard(f"{base}.program", lambda: _program_check(ifindex, name, named)))
    return out


def _program_check(ifindex: int, name: str, named: bool) -> Check:
    a = probe.attached(ifindex, name)
    facts = {"owner": a.owner, "prog_id": a.prog_id, "mode": a.mode}
    check_name = f"iface.{name}.program"
    if a.owner == "none":
        return Check(check_name, OK, "no XDP program: the broker attaches libxdp's XSK program at the first "
                     "grant", facts=facts)
    if a.owner == "ours":
        return Check(check_name, OK, f"{a.program} (id {a.prog_id}, {a.mode} mode, {a.detail}): "
                     "the broker's, reused by every grant", facts=facts)
    if a.owner == "unknown":
        return Check(check_name, UNKNOWN, f"XDP program id {a.prog_id} ({a.mode} mode); whose it is needs "
                     f"CAP_SYS_ADMIN ({a.detail}): run doctor as root to see", facts=facts)
    return Check(check_name, UNUSABLE if named else DEGRADED, f"another XDP program: {a.detail}",
                 f"grants on {name} are refused until it is detached (ip link set dev {name} xdp off, if it "
                 "is unused); xskbroker never replaces it", facts)


# ---- the socket and the policy
def _socket_access_fix(st: os.stat_result, owner: str, group: str) -> str:
    """How this user gets to connect to a socket it may not: joining the socket's group helps only where the mode
    lets the group write (connect(2) needs write permission), and not a member already refused."""
    if not st.st_mode & stat.S_IWGRP:
        return (f"its mode lets no group connect, only {owner}: give it a group that may (serve --socket-mode 0660 "
                "--socket-group GROUP, or SocketMode=0660 and SocketGroup= in xskbroker.socket), then add the "
                "user to that group")
    if st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        return (f"this user is in group {group} and the mode lets it connect: an ACL or a security module (SELinux, "
                "AppArmor) refuses it; look at getfacl and the audit log")
    return f"add the user to group {group} (the socket's group), then log in again"


def check_socket(path: str) -> tuple[Check, probe.ProcessLimits | None]:
    name = "socket"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Check(name, DEGRADED, f"no socket at {path}: no broker runs", "start it (systemctl enable --now "
                     "xskbroker.socket, or xskbroker serve --socket PATH), or name the socket with --socket",
                     {"path": path}), None
    except PermissionError:
        return Check(name, UNKNOWN, f"{path}: this user may not reach it (a directory on the way is closed)",
                     facts={"path": path}), None
    if not stat.S_ISSOCK(st.st_mode):
        return Check(name, UNUSABLE, f"{path} is not a socket", "remove it; the broker makes its own socket",
                     {"path": path}), None
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    facts: dict[str, Any] = {"path": path, "mode": f"{stat.S_IMODE(st.st_mode):04o}", "owner": owner,
                             "group": group}
    perms = f"{path} ({stat.filemode(st.st_mode)} {owner}:{group})"
    try:
        server, versions, pid = _hello(path)
    except PermissionError:
        return Check(name, DEGRADED, f"{perms}: this user may not connect", _socket_access_fix(st, owner, group),
                     facts), None
    except ConnectionRefusedError:
        return Check(name, DEGRADED, f"{perms}: nobody listens (a stale socket file)", "start the broker "
                     "(systemctl restart xskbroker.socket, or xskbroker serve)", facts), None
    except OSError as e:
        return Check(name, DEGRADED, f"{perms}: no answer to hello ({e})", "look at the broker's log "
                     "(journalctl -u xskbroker)", facts), None
    facts.update(server=server, versions=versions, pid=pid)
    others = " (any local user may connect: the policy decides)" if st.st_mode & 0o002 else ""
    found = f"{perms}{others}: the broker answers (pid {pid}, {server}, protocol {versions})"
    try:
        limits: probe.ProcessLimits | None = probe.process_limits(pid)
    except (OSError, ValueError):
        limits = None
    return Check(name, OK, found, facts=facts), limits


def _hello(path: str) -> tuple[str, list[int], int]:
    """(server, protocol versions, pid) from a hello over a fresh connection."""
    from xskbroker.wire import protocol, replies

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 3, 0))  # a full backlog waits
        s.connect(path)
        s.settimeout(3.0)
        pid = struct.unpack("=iII", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        s.send(protocol.encode_request(protocol.Hello(req_id="doctor")))
        try:
            reply = replies.decode_reply(s.recv(1 << 16))
        except protocol.BrokerError as e:
            raise OSError(errno.EPROTO, str(e)) from None
    if isinstance(reply, replies.ErrorReply):
        raise OSError(errno.EPROTO, f"{reply.code}: {reply.message}")
    if not isinstance(reply, replies.HelloReply):
        raise OSError(errno.EPROTO, f"a {reply.OP} reply to hello")
    return reply.server, list(reply.versions), pid


# where a broker keeps its last good policy: the unit's RuntimeDirectory=, and `serve`'s default
STATE_DIRS = ("/run/xskbroker/state", "/run/xskbroker")


def _last_good(state_dirs: tuple[str, ...]) -> lastgood.Copy | None:
    for d in state_dirs:
        try:
            # the broker writes its copy as its own uid (the unit's DynamicUser=), which is not doctor's: the
            # directory's owner's file is the broker's
            copy = lastgood.load(d, owner=os.stat(d).st_uid)
        except (OSError, lastgood.CopyError):
            continue
        if copy is not None:
            return copy
    return None


def check_policy(path: str, state_dirs: tuple[str, ...] = STATE_DIRS) -> Check:
    from xskbroker.policy import PolicyError, load_policy

    if not os.path.exists(path):
        return Check("policy", UNUSABLE, f"no policy at {path}: the broker does not start without one",
                     "write one (deploy/policy.example.toml shows the form) and check it with xskbroker policy "
                     "check, or name it with --policy", {"path": path})
    if not os.access(path, os.R_OK):
        return Check("policy", UNKNOWN, f"{path}: this user may not read it (as it should be): run doctor as root "
                     "to check it", facts={"path": path})
    try:
        policy = load_policy(path)
    except PolicyError as e:
        first = str(e).strip().splitlines()
        fix = f"fix what `xskbroker policy check {path}` names, then reload (systemctl reload xskbroker)"
        copy = _last_good(state_dirs)
        if copy is not None:  # the broker starts with it: degraded, not unusable
            saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(copy.saved_at))
            return Check("policy", DEGRADED, f"{path} is refused ({' / '.join(first[:3])}); the broker runs the "
                         f"last good copy saved {saved} ({copy.path})", fix,
                         {"path": path, "fallback": copy.path})
        return Check("policy", UNUSABLE, f"{path} is refused: {' / '.join(first[:3])}", fix, {"path": path})
    return Check("policy", OK, f"{path}: valid, {len(policy.rules)} rule(s) from {len(policy.sources)} file(s)",
                 facts={"path": path, "rules": len(policy.rules)})


# ---- all of it
def run_checks(interface: str | None, socket_path: str, policy_path: str) -> list[Check]:
    checks = [_guard("kernel.af_xdp", check_af_xdp), _guard("kernel.bindtodevice", check_bindtodevice)]
    for group in (check_sockets, check_libraries):
        try:
            checks += group()
        except Exception as e:
            checks.append(Check(group.__name__[6:], UNKNOWN, f"could not check: {e}"))
    checks.append(_guard("bpf", check_bpf))
    try:
        sock, broker = check_socket(socket_path)
    except Exception as e:
        sock, broker = Check("socket", UNKNOWN, f"could not check: {e}"), None
    checks.append(_guard("memlock.broker", lambda: check_broker_memlock(broker)))
    checks.append(_guard("memlock.consumer", lambda: check_consumer_memlock(broker)))
    if interface is not None:
        try:
            ifaces = [(probe.resolve(interface), interface)]
        except netdev.NoSuchInterface as e:
            checks.append(Check(f"iface.{interface}", UNUSABLE, str(e), "name an interface of this network "
                                "namespace (ip link); an alternative name is never resolved"))
            ifaces = []
    else:
        ifaces = probe.interfaces()
    for ifindex, name in ifaces:
        try:
            checks += check_interface(ifindex, name, interface is not None)
        except Exception as e:
            checks.append(Check(f"iface.{name}", UNKNOWN, f"could not check: {e}"))
    checks += [sock, _guard("policy", lambda: check_policy(policy_path))]
    return checks
