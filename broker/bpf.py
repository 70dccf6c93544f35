"""The few libbpf/libxdp calls the broker needs, through ctypes.

Every call is checked; failures raise OSError with the kernel's errno so callers can unwind.
The libraries are loaded on first use, which keeps them off the import path of `xskbroker --help`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

BPF_ANY = 0
BPF_NOEXIST = 1

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2

# enum xdp_attach_mode (libxdp)
XDP_MODE_UNSPEC = 0
XDP_MODE_NATIVE = 1
XDP_MODE_SKB = 2
XDP_MODE_HW = 3
LIBXDP_MODE_NAMES = {XDP_MODE_NATIVE: "native", XDP_MODE_SKB: "skb", XDP_MODE_HW: "hw"}

# enum bpf_xdp_attach_mode as reported by bpf_xdp_query (XDP_ATTACHED_*)
XDP_ATTACHED_NONE = 0
XDP_ATTACHED_DRV = 1
XDP_ATTACHED_SKB = 2
XDP_ATTACHED_HW = 3
XDP_ATTACHED_MULTI = 4


class XdpQueryOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_id", ctypes.c_uint32),
        ("drv_prog_id", ctypes.c_uint32),
        ("hw_prog_id", ctypes.c_uint32),
        ("skb_prog_id", ctypes.c_uint32),
        ("attach_mode", ctypes.c_uint8),
    ]


class XdpAttachOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int), ("_pad", ctypes.c_int)]


XDP_FLAGS_REPLACE = 1 << 4


class ProgInfo(ctypes.Structure):
    """Leading part of struct bpf_prog_info; the kernel fills at most info_len bytes."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


BPF_MAP_TYPE_XSKMAP = 17

# libbpf_print_fn_t / libxdp_print_fn_t: (level, format, va_list)
PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


def _load(name: str, soname: str) -> ctypes.CDLL:
    """The library by its soname (what Debian's runtime package installs); find_library only when that fails:
    it runs ldconfig in a child, ~17 ms of a socket-activated broker's first grant."""
    try:
        return ctypes.CDLL(soname, use_errno=True)
    except OSError:
        from ctypes.util import find_library
        found = find_library(name)
        if found is None:
            raise
        return ctypes.CDLL(found, use_errno=True)


@functools.cache
def libbpf() -> ctypes.CDLL:
    lib = _load("bpf", "libbpf.so.1")
    lib.bpf_map_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
    lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    lib.bpf_map_get_fd_by_id.argtypes = [ctypes.c_uint32]
    lib.bpf_xdp_query.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(XdpQueryOpts)]
    lib.bpf_xdp_attach.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(XdpAttachOpts)]
    lib.bpf_object__find_map_by_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.bpf_object__find_map_by_name.restype = ctypes.c_void_p
    lib.bpf_map__set_max_entries.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.bpf_object__find_map_fd_by_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.libbpf_set_print.argtypes = [PRINT_FN]
    lib.libbpf_set_print.restype = ctypes.c_void_p
    return lib


@functools.cache
def libxdp() -> ctypes.CDLL:
    lib = _load("xdp", "libxdp.so.1")
    ptr = ctypes.c_void_p
    lib.libxdp_get_error.argtypes = [ptr]
    lib.libxdp_get_error.restype = ctypes.c_long
    lib.xdp_program__find_file.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ptr]
    lib.xdp_program__find_file.restype = ptr
    lib.xdp_program__open_file.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ptr]
    lib.xdp_program__open_file.restype = ptr
    lib.xdp_program__bpf_obj.argtypes = [ptr]
    lib.xdp_program__bpf_obj.restype = ptr
    lib.xdp_program__attach.argtypes = [ptr, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
    lib.xdp_program__detach.argtypes = [ptr, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
    lib.xdp_program__from_id.argtypes = [ctypes.c_uint32]
    lib.xdp_program__from_id.restype = ptr
    lib.xdp_program__fd.argtypes = [ptr]
    lib.xdp_program__id.argtypes = [ptr]
    lib.xdp_program__id.restype = ctypes.c_uint32
    lib.xdp_program__close.argtypes = [ptr]
    lib.xdp_program__close.restype = None
    lib.xdp_multiprog__get_from_ifindex.argtypes = [ctypes.c_int]
    lib.xdp_multiprog__get_from_ifindex.restype = ptr
    lib.xdp_multiprog__close.argtypes = [ptr]
    lib.xdp_multiprog__close.restype = None
    lib.xdp_multiprog__is_legacy.argtypes = [ptr]
    lib.xdp_multiprog__is_legacy.restype = ctypes.c_bool
    lib.xdp_multiprog__main_prog.argtypes = [ptr]
    lib.xdp_multiprog__main_prog.restype = ptr
    lib.xdp_multiprog__next_prog.argtypes = [ptr, ptr]
    lib.xdp_multiprog__next_prog.restype = ptr
    lib.xdp_multiprog__attach_mode.argtypes = [ptr]
    lib.xdp_program__name.argtypes = [ptr]
    lib.xdp_program__name.restype = ctypes.c_char_p
    # libxdp prints its own diagnostics to stderr by default; the broker reports errors itself.
    lib.libxdp_set_print.argtypes = [PRINT_FN]
    lib.libxdp_set_print.restype = ctypes.c_void_p
    return lib


def check(ret: int, what: str) -> int:
    """libbpf/libxdp return -errno (or -1 with errno set); turn that into OSError."""
    if ret < 0:
        err = -ret if ret != -1 else (ctypes.get_errno() or errno.EIO)
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def check_ptr(ptr: int | None, what: str) -> int:
    err = libxdp().libxdp_get_error(ptr)
    if err:
        e = -err
        raise OSError(e, f"{what}: {os.strerror(e)}")
    if not ptr:
        raise OSError(errno.ENOENT, f"{what}: no result")
    return ptr


def map_update(map_fd: int, key: int, value: int, flags: int = BPF_ANY) -> None:
    k = ctypes.c_uint32(key)
    v = ctypes.c_uint32(value)
    check(libbpf().bpf_map_update_elem(map_fd, ctypes.byref(k), ctypes.byref(v), flags),
          f"map update of slot {key}")


def map_delete(map_fd: int, key: int) -> bool:
    """Delete a slot; False when it was already empty."""
    k = ctypes.c_uint32(key)
    ret = libbpf().bpf_map_delete_elem(map_fd, ctypes.byref(k))
    if ret < 0:
        err = -ret if ret != -1 else ctypes.get_errno()
        if err == errno.ENOENT:
            return False
        check(ret, f"map delete of slot {key}")
    return True


def prog_info(prog_fd: int) -> tuple[ProgInfo, list[int]]:
    """Program info and the ids of the maps it uses."""
    info = ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(libbpf().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size)), "program info")
    count = info.nr_map_ids
    ids = (ctypes.c_uint32 * max(count, 1))()
    info2 = ProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(ids))
    size = ctypes.c_uint32(ctypes.sizeof(info2))
    check(libbpf().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info2), ctypes.byref(size)), "program map ids")
    return info2, list(ids[: min(count, info2.nr_map_ids)])


def map_info(map_fd: int) -> MapInfo:
    info = MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    check(libbpf().bpf_obj_get_info_by_fd(map_fd, ctypes.byref(info), ctypes.byref(size)), "map info")
    return info


def prog_fd_by_id(prog_id: int) -> int:
    return check(libbpf().bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    return check(libbpf().bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")


def xdp_query(ifindex: int) -> XdpQueryOpts:
    opts = XdpQueryOpts(sz=ctypes.sizeof(XdpQueryOpts))
    check(libbpf().bpf_xdp_query(ifindex, 0, ctypes.byref(opts)), f"XDP query of ifindex {ifindex}")
    return opts


def xdp_detach(ifindex: int, prog_id: int, mode_flags: int) -> None:
    """Detach the XDP program prog_id, and only it (XDP_FLAGS_REPLACE: the kernel checks it is the one
    attached, so a program someone attached meanwhile stays)."""
    prog_fd = prog_fd_by_id(prog_id)
    try:
        opts = XdpAttachOpts(sz=ctypes.sizeof(XdpAttachOpts), old_prog_fd=prog_fd)
        check(libbpf().bpf_xdp_attach(ifindex, -1, mode_flags | XDP_FLAGS_REPLACE, ctypes.byref(opts)),
              f"detach XDP program {prog_id} from ifindex {ifindex}")
    finally:
        os.close(prog_fd)
