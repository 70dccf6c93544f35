"""Find or attach libxdp's default XSK redirect program on an interface.

The program is libxdp's own `xsk_def_prog` (the one QEMU, DPDK and OVS use): it redirects each RX
queue to xsks_map[queue] and passes the packet on when the slot is empty. A program some earlier broker
attached is reused; any other program is refused, never replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from xskbroker.broker import bpf
from xskbroker.common.records import record

XSK_PROG_NAME = "xsk_def_prog"
XSK_MAP_NAME = "xsks_map"
XSK_PROG_FILE = "xsk_def_xdp_prog.o"
DISPATCHER_NAME = "xdp_dispatcher"
MODES = ("auto", "native", "skb")


_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}


def bpf_blocked() -> bool:
    """Whether bpf(2) is refused to this process before the kernel sees it: a seccomp filter (a container
    runtime's default profile, a unit's SystemCallFilter= without bpf). Probed with a command no kernel
    knows, which reaches the kernel's EINVAL unless a filter answers EPERM/ENOSYS first."""
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        return False
    try:
        with open("/proc/self/status") as f:
            filtered = any(line.split()[1:] == ["2"] for line in f if line.startswith("Seccomp:"))
    except OSError:
        return False
    if not filtered:  # no filter: an EPERM is the kernel's own (capabilities), not "bpf() is blocked"
        return False
    import ctypes  # only on this error path

    from xskbroker.common.libc import libc
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_int(0x7FFF), ctypes.c_void_p(None), ctypes.c_uint(0))
    return ret == -1 and ctypes.get_errno() in (errno.EPERM, errno.ENOSYS)


class ForeignProgram(OSError):
    """Another XDP program owns the interface."""


@record
class XskProgram:
    ifindex: int
    prog_id: int
    map_fd: int
    mode: str  # "native" or "skb"
    max_entries: int
    attached_now: bool  # True when this call attached it, False when reused
    per_queue: bool = False  # libxdp's program: one xsks_map for every queue
    outer_fd: int = -1

    def close(self) -> None:
        if self.map_fd >= 0:
            os.close(self.map_fd)
            self.map_fd = -1


def _quiet(level: int, fmt: bytes, args: int) -> int:
    return 0


_QUIET: object = None


def _silence_libxdp() -> None:
    # libxdp logs its dispatcher fallback to stderr; the broker reports outcomes itself.
    global _QUIET
    if _QUIET is None:
        lib = bpf.libxdp()
        _QUIET = lib.libxdp_set_print.argtypes[0](_quiet)
        lib.libxdp_set_print(_QUIET)
        bpf.libbpf().libbpf_set_print(_QUIET)


def attached(ifindex: int) -> tuple[int, str | None]:
    """(program id, mode) of the XDP program on the interface, (0, None) when there is none."""
    q = bpf.xdp_query(ifindex)
    if q.attach_mode == bpf.XDP_ATTACHED_NONE:
        return 0, None
    if q.attach_mode == bpf.XDP_ATTACHED_MULTI:
        raise ForeignProgram(errno.EEXIST, f"ifindex {ifindex} has XDP programs attached in several modes")
    mode = {bpf.XDP_ATTACHED_DRV: "native", bpf.XDP_ATTACHED_SKB: "skb", bpf.XDP_ATTACHED_HW: "hw"}[
        q.attach_mode]
    return q.prog_id, mode


def _xsk_map_of(prog_id: int) -> tuple[str, int, int]:
    """(program name, xsks_map fd or -1, map max_entries) of a loaded program."""
    prog_fd = bpf.prog_fd_by_id(prog_id)
    try:
        info, map_ids = bpf.prog_info(prog_fd)
    finally:
        os.close(prog_fd)
    name = info.name.decode(errors="replace")
    for map_id in map_ids:
        fd = bpf.map_fd_by_id(map_id)
        try:
            minfo = bpf.map_info(fd)
        except BaseException:
            os.close(fd)
            raise
        if minfo.type == bpf.BPF_MAP_TYPE_XSKMAP and minfo.name == XSK_MAP_NAME.encode():
            return name, fd, minfo.max_entries
        os.close(fd)
    return name, -1, 0


def _dispatcher_component(ifindex: int) -> int:
    """Id of our program inside a libxdp multi-program dispatcher, 0 if absent. The program fds libxdp leaves
    open are closed (_closing_leaks): a grant refused for a dispatcher without our program left one each."""
    lib = bpf.libxdp()
    with _closing_leaks():
        mp = lib.xdp_multiprog__get_from_ifindex(ifindex)
        if lib.libxdp_get_error(mp) or not mp:
            return 0
        try:
            prog = lib.xdp_multiprog__next_prog(None, mp)
            while prog:
                if (lib.xdp_program__name(prog) or b"").decode(errors="replace") == XSK_PROG_NAME:
                    return int(lib.xdp_program__id(prog))
                prog = lib.xdp_multiprog__next_prog(prog, mp)
        finally:
            lib.xdp_multiprog__close(mp)
    return 0


def adopt(ifindex: int, ifname: str, prog_id: int, mode: str) -> XskProgram:
    name, map_fd, entries = _xsk_map_of(prog_id)
    if name == DISPATCHER_NAME:
        component = _dispatcher_component(ifindex)
        if component:
            if map_fd >= 0:  # a dispatcher with an xsks_map of its own: not the one the component uses
                os.close(map_fd)
                map_fd = -1
            name, map_fd, entries = _xsk_map_of(component)
    if name != XSK_PROG_NAME or map_fd < 0:
        if map_fd >= 0:
            os.close(map_fd)
        raise ForeignProgram(
            errno.EEXIST,
            f"{ifname} already has XDP program {name!r} (id {prog_id}, {mode} mode); xskbroker never "
            f"replaces another program: detach it first (ip link set dev {ifname} xdp off) if it is unused")
    return XskProgram(ifindex, prog_id, map_fd, mode, entries, attached_now=False)


def _load_and_attach(ifindex: int, ifname: str, queues: int, mode: str) -> XskProgram:
    lib, bpflib = bpf.libxdp(), bpf.libbpf()
    _silence_libxdp()
    tries = {"auto": [bpf.XDP_MODE_NATIVE, bpf.XDP_MODE_SKB], "native": [bpf.XDP_MODE_NATIVE],
             "skb": [bpf.XDP_MODE_SKB]}[mode]
    errors: list[str] = []
    last_errno = errno.EOPNOTSUPP
    for attach_mode in tries:
        # A program object can be attached once: open a fresh one for every attempt.
        prog = bpf.check_ptr(lib.xdp_program__find_file(XSK_PROG_FILE.encode(), b"xdp", None),
                             f"open {XSK_PROG_FILE} (is libxdp1 installed?)")
        try:
            obj = lib.xdp_program__bpf_obj(prog)
            xmap = bpflib.bpf_object__find_map_by_name(obj, XSK_MAP_NAME.encode())
            if not xmap:
                raise OSError(errno.ENOENT, f"{XSK_PROG_FILE} has no map {XSK_MAP_NAME}")
            bpf.check(bpflib.bpf_map__set_max_entries(xmap, queues), "size xsks_map")
            ret = lib.xdp_program__attach(prog, ifindex, attach_mode, 0)
            if ret < 0:
                errors.append(f"{bpf.LIBXDP_MODE_NAMES[attach_mode]}: {os.strerror(-ret)}")
                last_errno = -ret
                if -ret == errno.EEXIST:
                    break  # someone attached a program meanwhile: report it, don't retry another mode
                continue
            try:
                map_fd = os.dup(bpf.check(bpflib.bpf_object__find_map_fd_by_name(obj, XSK_MAP_NAME.encode()),
                                          "find xsks_map fd"))
                prog_id = int(lib.xdp_program__id(prog))
            except BaseException:
                lib.xdp_program__detach(prog, ifindex, attach_mode, 0)
                raise
            return XskProgram(ifindex, prog_id, map_fd, bpf.LIBXDP_MODE_NAMES[attach_mode], queues,
                              attached_now=True)
        finally:
            lib.xdp_program__close(prog)
    raise OSError(last_errno, f"cannot attach the XSK program to {ifname}: " + "; ".join(errors))


def find_or_attach(ifindex: int, ifname: str, queues: int, mode: str = "auto") -> XskProgram:
    """The XSK program on the interface with an owned xsks_map fd, attaching it when absent."""
    if mode not in MODES:
        raise ValueError(f"xdp mode must be one of {', '.join(MODES)}")
    prog_id, current = attached(ifindex)
    if prog_id:
        prog = adopt(ifindex, ifname, prog_id, current or "?")
        if mode != "auto" and prog.mode != mode:
            prog.close()
            raise ForeignProgram(errno.EEXIST, f"{ifname} has the XSK program in {current} mode, not {mode}")
        return prog
    try:
        return _load_and_attach(ifindex, ifname, queues, mode)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        # Lost a race with another attacher: adopt what is there now, or refuse it.
        prog_id, current = attached(ifindex)
        if not prog_id:
            raise
        return adopt(ifindex, ifname, prog_id, current or "?")




def _bpf_prog_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:bpf-prog":
                out.add(int(name))
    return out


@contextlib.contextmanager
def _closing_leaks() -> Iterator[None]:
    """libxdp's program-by-id objects leave a program fd open after they are closed (libxdp 1.x): close the
    program fds a libxdp call left behind (the broker holds no libxdp object across calls)."""
    before = _bpf_prog_fds()
    try:
        yield
    finally:
        for fd in _bpf_prog_fds() - before:
            with contextlib.suppress(OSError):
                os.close(fd)


def detach(ifindex: int, map_id: int = 0) -> int:
    """Detach the XSK program whose xsks_map has id map_id (any XSK program for 0) from the interface.
    Returns its id, 0 when it is not attached (another program there is never touched).

    Attached alone, it goes with an atomic replace-by-nothing; inside libxdp's dispatcher, libxdp takes it
    out (and removes the dispatcher with its last program)."""
    prog_id, mode = attached(ifindex)
    if not prog_id or mode not in ("native", "skb"):
        return 0
    name, map_fd, _ = _xsk_map_of(prog_id)
    component = 0
    if name == DISPATCHER_NAME:
        if map_fd >= 0:
            os.close(map_fd)
        with _closing_leaks():
            component = _dispatcher_component(ifindex)
        name, map_fd, _ = _xsk_map_of(component) if component else (name, -1, 0)
    try:
        if name != XSK_PROG_NAME or map_fd < 0 or (map_id and bpf.map_info(map_fd).id != map_id):
            return 0
    finally:
        if map_fd >= 0:
            os.close(map_fd)
    if not component:
        flags = bpf.XDP_FLAGS_DRV_MODE if mode == "native" else bpf.XDP_FLAGS_SKB_MODE
        bpf.xdp_detach(ifindex, prog_id, flags)
        return prog_id
    lib = bpf.libxdp()
    _silence_libxdp()
    with _closing_leaks():
        prog = bpf.check_ptr(lib.xdp_program__from_id(component), f"open XDP program {component}")
        try:
            mode_flag = {"native": bpf.XDP_MODE_NATIVE, "skb": bpf.XDP_MODE_SKB}[mode]
            ret = lib.xdp_program__detach(prog, ifindex, mode_flag, 0)
        finally:
            lib.xdp_program__close(prog)
    if ret < 0:
        raise OSError(-ret, f"detach XDP program {component} from ifindex {ifindex}: {os.strerror(-ret)}")
    return component
