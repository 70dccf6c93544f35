"""What `xskbroker doctor` asks the kernel: small probes that look and never change anything.

Each probe makes at most a throw-away object (a socket pair, a one-entry BPF map, a two-instruction XDP
program that is never attached) and closes it at once. None of them attaches, binds, pins or writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import socket
import struct

from xskbroker.broker import bpf, netdev, netlink, queue_prog, xdp_prog
from xskbroker.common.libc import libc
from xskbroker.common.procfs import SO_PEERPIDFD, has_cap, memlock_limits, pidfd_ino, pidfd_open, status_fields
from xskbroker.common.records import record

CAP_NET_RAW, CAP_IPC_LOCK, CAP_SYS_ADMIN, CAP_SYS_RESOURCE, CAP_BPF = 13, 14, 21, 24, 39
AF_XDP = 44
SO_PASSRIGHTS = getattr(socket, "SO_PASSRIGHTS", 83)

# ---- bpf(2), raw: libbpf's wrappers would log and probe features around the one call we want to see
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}.get(os.uname().machine, 321)
BPF_MAP_CREATE, BPF_PROG_LOAD = 0, 5
BPF_MAP_TYPE_ARRAY, BPF_PROG_TYPE_XDP = 2, 6
XDP_PASS_PROG = struct.pack("<BBhiBBhi", 0xB7, 0, 0, 2, 0x95, 0, 0, 0)  # r0 = XDP_PASS; exit


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    fd = int(libc.syscall(SYS_BPF, cmd, buf, 128))
    if fd < 0:
        err = ctypes.get_errno() or errno.EIO
        raise OSError(err, os.strerror(err))
    return fd


def bpf_map_create() -> None:
    """A one-entry array map, closed at once (OSError with the kernel's errno when refused)."""
    os.close(_bpf(BPF_MAP_CREATE, struct.pack("=4I", BPF_MAP_TYPE_ARRAY, 4, 4, 1)))


def bpf_prog_load() -> None:
    """An XDP program that returns XDP_PASS, loaded (never attached) and closed at once."""
    insns = ctypes.create_string_buffer(XDP_PASS_PROG, len(XDP_PASS_PROG))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack("=IIQQIIQ", BPF_PROG_TYPE_XDP, 2, ctypes.addressof(insns), ctypes.addressof(lic), 0, 0, 0)
    os.close(_bpf(BPF_PROG_LOAD, attr))


# ---- process facts
@record(frozen=True)
class ProcessLimits:
    pid: int
    uid: int
    soft: int | None  # RLIMIT_MEMLOCK in bytes, None: unlimited
    hard: int | None
    ipc_lock: bool  # CAP_IPC_LOCK effective: pinning ignores the limit
    sys_resource: bool  # CAP_SYS_RESOURCE effective: may raise hard limits (its own, others')
    sys_resource_bound: bool  # in the bounding set: could ever be had
    comm: str = ""


def process_limits(pid: int | str = "self") -> ProcessLimits:
    """Memlock limits and the capabilities that matter for them, from /proc (readable by anyone)."""
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    with open(f"/proc/{pid}/limits") as f:
        limits = memlock_limits(f.read()) or (None, None)
    fields = status_fields(status)
    return ProcessLimits(int(fields.get("Pid", "0")), int(fields.get("Uid", "0").split()[0]), limits[0], limits[1],
                         has_cap(status, CAP_IPC_LOCK), has_cap(status, CAP_SYS_RESOURCE),
                         has_cap(status, CAP_SYS_RESOURCE, "CapBnd"), fields.get("Name", ""))


def effective_caps() -> set[int]:
    with open("/proc/self/status") as f:
        status = f.read()
    return {c for c in (CAP_NET_RAW, CAP_IPC_LOCK, CAP_SYS_ADMIN, CAP_SYS_RESOURCE, CAP_BPF) if has_cap(status, c)}


def seccomp_mode() -> int:
    with open("/proc/self/status") as f:
        return int(status_fields(f.read()).get("Seccomp", "0"))


def lockdown() -> str | None:
    """The kernel lockdown mode ([none] integrity confidentiality: the bracketed one), None if unknown."""
    try:
        with open("/sys/kernel/security/lockdown") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def limits_conf_memlock() -> list[str]:
    """The memlock lines of pam_limits' files (what a login session of a consumer gets)."""
    lines = []
    for path in ["/etc/security/limits.conf", *sorted(glob.glob("/etc/security/limits.d/*.conf"))]:
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                words = line.split("#", 1)[0].split()
                if len(words) == 4 and words[2] == "memlock":
                    lines.append(f"{os.path.basename(path)}: {' '.join(words)}")
    return lines


def systemd_default_memlock() -> str | None:
    """DefaultLimitMEMLOCK= set in system.conf or its drop-ins (None: systemd's built-in default)."""
    value = None
    for path in ["/etc/systemd/system.conf", *sorted(glob.glob("/etc/systemd/system.conf.d/*.conf"))]:
        with contextlib.suppress(OSError), open(path) as f:
            for line in f:
                key, sep, rest = line.strip().partition("=")
                if sep and key == "DefaultLimitMEMLOCK":
                    value = rest.strip()
    return value


# ---- kernel features
def socket_features() -> dict[str, bool | None]:
    """SO_PEERPIDFD and SO_PASSRIGHTS on a socket pair; pidfds on pidfs. None: could not tell."""
    out: dict[str, bool | None] = {}
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        try:
            fd = int.from_bytes(a.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4), "little", signed=True)
            os.close(fd)
            out["peerpidfd"] = True
        except OSError as e:
            out["peerpidfd"] = False if e.errno == errno.ENOPROTOOPT else None
        try:
            a.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
            out["passrights"] = True
        except OSError as e:
            out["passrights"] = False if e.errno == errno.ENOPROTOOPT else None
    pidfd = pidfd_open(os.getpid())
    if pidfd is None:
        out["pidfs"] = None
    else:
        try:
            out["pidfs"] = pidfd_ino(pidfd) is not None
        finally:
            os.close(pidfd)
    return out


def af_xdp() -> int:
    """0 when an AF_XDP socket can be made here, else the errno."""
    try:
        socket.socket(AF_XDP, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0).close()
    except OSError as e:
        return e.errno or errno.EIO
    return 0


# ---- libraries
def _mapped(fragment: str) -> str | None:
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split(None, 5)[-1].strip()
            if fragment in os.path.basename(path):
                return path
    return None


def libraries() -> dict[str, str | None]:
    """Paths and versions of libbpf and libxdp as loaded here (an error text for one that does not load)."""
    out: dict[str, str | None] = {}
    try:
        lib = bpf.libbpf()
        fn = getattr(lib, "libbpf_version_string", None)
        if fn is not None:
            fn.restype = ctypes.c_char_p
            out["libbpf_version"] = fn().decode()
        out["libbpf"] = _mapped("libbpf.so")
    except OSError as e:
        out["libbpf_error"] = str(e)
    try:
        bpf.libxdp()
        path = _mapped("libxdp.so")
        out["libxdp"] = path
        real = os.path.basename(os.path.realpath(path)) if path else ""
        # libxdp exports no version call: the file name carries it (libxdp.so.1.3.0)
        out["libxdp_version"] = real.split(".so.", 1)[1] if ".so." in real else None
    except OSError as e:
        out["libxdp_error"] = str(e)
    return out


def xsk_object() -> tuple[str | None, str | None]:
    """(path of libxdp's XSK program object, error) as libxdp finds it: the broker's own lookup."""
    dirs = [d for d in os.environ.get("LIBXDP_OBJECT_PATH", "").split(":") if d]
    dirs += [*sorted(glob.glob("/usr/lib/*/bpf")), "/usr/lib/bpf", "/usr/lib64/bpf", "/usr/local/lib/bpf"]
    path = next((p for d in dirs if os.path.isfile(p := os.path.join(d, xdp_prog.XSK_PROG_FILE))), None)
    try:
        lib = bpf.libxdp()
        xdp_prog._silence_libxdp()
        prog = bpf.check_ptr(lib.xdp_program__find_file(xdp_prog.XSK_PROG_FILE.encode(), b"xdp", None),
                             f"open {xdp_prog.XSK_PROG_FILE}")
        lib.xdp_program__close(prog)  # opened from the file only: nothing was loaded into the kernel
    except OSError as e:
        return path, e.strerror or str(e)
    return path, None


# ---- interfaces
SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x3
DRVINFO = struct.Struct("=I32s32s32s32s32s12s5I")


def driver(name: str) -> str | None:
    """The interface's driver (ethtool drvinfo, allowed to anyone), None when it has none to tell."""
    buf = ctypes.create_string_buffer(DRVINFO.pack(ETHTOOL_GDRVINFO, *(b"",) * 6, *(0,) * 5), DRVINFO.size)
    ifreq = struct.pack("16sP16x", name.encode()[:15], ctypes.addressof(buf))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
        except OSError:
            return None
    return bytes(DRVINFO.unpack(buf.raw)[1]).split(b"\0", 1)[0].decode(errors="replace") or None


# netdev generic netlink family (Linux 6.3+): what XDP a device's driver implements
GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 0x10, 3, 1, 2
NETDEV_CMD_DEV_GET, NETDEV_A_DEV_IFINDEX, NETDEV_A_DEV_XDP_FEATURES, NETDEV_A_DEV_XDP_ZC_MAX_SEGS = 1, 1, 3, 4
XDP_ACT_BASIC, XDP_ACT_REDIRECT, XDP_ACT_XSK_ZEROCOPY = 1 << 0, 1 << 1, 1 << 3
NLM_F_REQUEST = 1
GENLMSGHDR = struct.Struct("=BBH")


def _genl(sock: socket.socket, family: int, cmd: int, attr_type: int, value: bytes) -> dict[int, bytes]:
    attr = netlink.NLA.pack(netlink.NLA.size + len(value), attr_type) + value
    attr += b"\0" * (netlink.align(len(attr)) - len(attr))
    body = GENLMSGHDR.pack(cmd, 1, 0) + attr
    sock.send(netlink.NLMSGHDR.pack(netlink.NLMSGHDR.size + len(body), family, NLM_F_REQUEST, 1, 0) + body)
    for _, payload in netlink.messages(sock.recv(65536)):
        return netlink.attrs(payload, GENLMSGHDR.size)
    raise OSError(errno.EBADMSG, "no reply from generic netlink")


@record(frozen=True)
class XdpFeatures:
    basic: bool  # native (driver) XDP
    redirect: bool
    zerocopy: bool  # AF_XDP zero-copy
    zc_max_segs: int


def xdp_features(ifindex: int) -> XdpFeatures | None:
    """The driver's XDP features as the netdev family reports them; None on kernels without it (< 6.3)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 16) as s:  # NETLINK_GENERIC
        s.settimeout(2.0)
        try:
            fam = _genl(s, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_NAME, b"netdev\0")
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        family = struct.unpack("=H", fam[CTRL_ATTR_FAMILY_ID][:2])[0]
        dev = _genl(s, family, NETDEV_CMD_DEV_GET, NETDEV_A_DEV_IFINDEX, struct.pack("=I", ifindex))
    flags = struct.unpack("=Q", dev[NETDEV_A_DEV_XDP_FEATURES][:8])[0] if NETDEV_A_DEV_XDP_FEATURES in dev else 0
    segs = struct.unpack("=I", dev[NETDEV_A_DEV_XDP_ZC_MAX_SEGS][:4])[0] if NETDEV_A_DEV_XDP_ZC_MAX_SEGS in dev else 0
    return XdpFeatures(bool(flags & XDP_ACT_BASIC), bool(flags & XDP_ACT_REDIRECT),
                       bool(flags & XDP_ACT_XSK_ZEROCOPY), segs)


@record(frozen=True)
class Attached:
    owner: str  # "none", "ours", "foreign", "unknown" (this user may not look inside the program)
    prog_id: int = 0
    mode: str | None = None
    detail: str = ""
    program: str = "libxdp's XSK program"  # which of the broker's two programs, when ours


def _queue_program_entries(prog_id: int) -> int | None:
    """The queue count of the broker's own per-queue program (queue_prog: attached once an interface has a map
    grant), None when prog_id is another program. Known by its name and its outer map's."""
    prog_fd = bpf.prog_fd_by_id(prog_id)
    try:
        info, map_ids = bpf.prog_info(prog_fd)
    finally:
        os.close(prog_fd)
    if info.name.decode(errors="replace") != queue_prog.PROG_NAME:
        return None
    for map_id in map_ids:
        fd = bpf.map_fd_by_id(map_id)
        try:
            minfo = bpf.map_info(fd)
        finally:
            os.close(fd)
        if minfo.name == queue_prog.OUTER_NAME.encode():
            return int(minfo.max_entries)
    return None


def attached(ifindex: int, ifname: str) -> Attached:
    """What XDP program the interface has: none, libxdp's XSK program or the broker's per-queue one (ours),
    another one (foreign)."""
    try:
        prog_id, mode = xdp_prog.attached(ifindex)
    except xdp_prog.ForeignProgram as e:
        return Attached("foreign", 0, "multi", e.strerror or str(e))
    if not prog_id:
        return Attached("none")
    try:
        prog = xdp_prog.adopt(ifindex, ifname, prog_id, mode or "?")
    except xdp_prog.ForeignProgram as e:
        try:  # not libxdp's: the broker's per-queue program (map grants) is ours too, never to be detached
            entries = _queue_program_entries(prog_id)
        except OSError:
            entries = None
        if entries is not None:
            return Attached("ours", prog_id, mode, f"outer map of {entries} queues",
                            "the broker's per-queue XSK program (map grants)")
        return Attached("foreign", prog_id, mode, e.strerror or str(e))
    except OSError as e:  # opening a program by id needs CAP_SYS_ADMIN
        return Attached("unknown", prog_id, mode, e.strerror or str(e))
    entries = prog.max_entries
    prog.close()
    return Attached("ours", prog_id, mode, f"xsks_map of {entries} slots")


def interfaces() -> list[tuple[int, str]]:
    """(ifindex, name) of every interface in this network namespace but the loopback."""
    return [(i, n) for i, n in socket.if_nameindex() if n != "lo"]


def resolve(name: str) -> int:
    return netdev.resolve(name)


def queue_count(name: str) -> int:
    return netdev.queue_count(name)
