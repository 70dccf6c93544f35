"""bpf(2) itself, for what libbpf has no object file for: maps made at run time, a program of a dozen
instructions, bpf_links and pins. Each call fills the leading fields of union bpf_attr (the kernel
zero-checks the rest) and raises OSError with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from xskbroker.common.libc import libc

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_LINK_CREATE = 28
BPF_MAP_UPDATE_BATCH = 26
ENOTSUPP = 524  # the kernel's own "operation not supported" (not in errno)

BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_XSKMAP = 17
BPF_PROG_TYPE_XDP = 6
BPF_XDP = 37  # enum bpf_attach_type
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_F_RDONLY = 1 << 3  # file_flags of BPF_OBJ_GET

_ATTR_SIZE = 128


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"{what}: no bpf syscall number known for {os.uname().machine}")
    ret = int(libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(_ATTR_SIZE)))
    if ret < 0:
        err = ctypes.get_errno() or errno.EIO
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _attr(fmt: str, *values: int | bytes) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def map_create(map_type: int, max_entries: int, name: str, inner_map_fd: int = 0) -> int:
    """A map with 4-byte keys and values (an XSKMAP, or an array of maps whose template is inner_map_fd)."""
    attr = _attr("=6I4x16s", map_type, 4, 4, max_entries, 0, inner_map_fd, name.encode()[:15])
    return _bpf(BPF_MAP_CREATE, attr, f"create map {name}")


def _elem(cmd: int, map_fd: int, key: int, value: ctypes.c_uint32 | None, flags: int, what: str) -> int:
    k = ctypes.c_uint32(key)
    attr = _attr("=I4xQQQ", map_fd, ctypes.addressof(k), ctypes.addressof(value) if value is not None else 0, flags)
    return _bpf(cmd, attr, what)


def map_update(map_fd: int, key: int, value: int, flags: int = BPF_ANY) -> None:
    _elem(BPF_MAP_UPDATE_ELEM, map_fd, key, ctypes.c_uint32(value), flags, f"map update of slot {key}")


def map_update_all(map_fd: int, keys: list[int], value: int) -> None:
    """Set every slot of keys to value in one BPF_MAP_UPDATE_BATCH: a map-in-map update waits for an RCU grace
    period (maybe_wait_bpf_programs, ~9 ms here), and a batch waits once (Linux 6.8+) where single updates wait once
    each. Slot by slot where the kernel has no batch update for the map (EINVAL, ENOTSUPP)."""
    if not keys:
        return
    k = (ctypes.c_uint32 * len(keys))(*keys)
    v = (ctypes.c_uint32 * len(keys))(*([value] * len(keys)))
    attr = _attr("=QQQQII", 0, 0, ctypes.addressof(k), ctypes.addressof(v), len(keys), map_fd)
    try:
        _bpf(BPF_MAP_UPDATE_BATCH, attr, f"map update of slots {keys[0]}-{keys[-1]}")
    except OSError as e:
        if e.errno not in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP):
            raise
        for key in keys:  # BPF_ANY: the slots the batch set already are set again, to the same value
            map_update(map_fd, key, value)


def map_delete(map_fd: int, key: int) -> bool:
    """Empty a slot; False when it was empty already."""
    try:
        _elem(BPF_MAP_DELETE_ELEM, map_fd, key, None, 0, f"map delete of slot {key}")
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(map_fd: int, key: int) -> int | None:
    """A slot's 4-byte value (an array of maps answers the inner map's id), None when empty."""
    value = ctypes.c_uint32(0)
    try:
        _elem(BPF_MAP_LOOKUP_ELEM, map_fd, key, value, 0, f"map lookup of slot {key}")
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return int(value.value)


def prog_load_xdp(insns: bytes, name: str) -> int:
    """Load an XDP program (GPL: bpf_redirect_map is GPL-only); the verifier's log is in the error."""
    license_ = ctypes.create_string_buffer(b"GPL")
    code = ctypes.create_string_buffer(insns, len(insns))
    log = ctypes.create_string_buffer(1 << 14)
    attr = _attr("=IIQQIIQII16sII", BPF_PROG_TYPE_XDP, len(insns) // 8, ctypes.addressof(code),
                 ctypes.addressof(license_), 0, 0, 0, 0, 0, name.encode()[:15], 0, BPF_XDP)
    try:
        return _bpf(BPF_PROG_LOAD, attr, f"load program {name}")
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EACCES):
            raise
        attr = _attr("=IIQQIIQII16sII", BPF_PROG_TYPE_XDP, len(insns) // 8, ctypes.addressof(code),
                     ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0, name.encode()[:15], 0,
                     BPF_XDP)
        try:
            return _bpf(BPF_PROG_LOAD, attr, f"load program {name}")
        except OSError as again:
            text = log.value.decode(errors="replace").strip().splitlines()[-3:]
            raise OSError(again.errno, f"load program {name}: {os.strerror(again.errno or 0)}: "
                          + " / ".join(text)) from None


def link_create_xdp(prog_fd: int, ifindex: int, mode_flags: int) -> int:
    """Attach an XDP program through a bpf_link: only the link's owner can detach it (netlink gets EBUSY)."""
    attr = _attr("=IIII", prog_fd, ifindex, BPF_XDP, mode_flags)
    return _bpf(BPF_LINK_CREATE, attr, f"attach XDP link to ifindex {ifindex}")


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(BPF_OBJ_PIN, _attr("=QI", ctypes.addressof(p), fd), f"pin {path}")


def obj_get(path: str, flags: int = 0) -> int:
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(BPF_OBJ_GET, _attr("=QII", ctypes.addressof(p), 0, flags), f"open pinned {path}")


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
