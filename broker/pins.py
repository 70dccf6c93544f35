"""Tenant maps pinned in bpffs, for consumers that open a map by path (DPDK's use_pinned_map=1, QEMU's
map-path=): <root>/<uid>/<iface>/xsks_map.

<root> is the broker's (root-owned, 0755, on a bpffs); <root>/<uid> belongs to the tenant with mode 0700,
so no other uid can reach the pins inside; the pin itself is the tenant's (0600). The tenant owns its
directory and so could plant links in it: everything under <root> is reached by directory fds opened with
O_NOFOLLOW, never by a path the kernel would resolve through a link. Nor is anything in it changed by name:
a name there may be swapped at any moment for a hard link to another file of the filesystem. A pin is made and
given to its tenant in <root>/pinning (the broker's, 0700) and only then linked into the tenant's directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from xskbroker.broker import bpfsys

BPF_FS_MAGIC = 0xCAFE4A11
PIN_NAME = "xsks_map"
STAGING = "pinning"  # in <root>, beside the tenants' <uid> directories (digits); bpffs refuses a name with a dot
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def is_bpffs(path: str) -> bool:
    import ctypes

    from xskbroker.common.libc import libc

    buf = ctypes.create_string_buffer(128)  # struct statfs: f_type first
    if libc.statfs(os.fsencode(path), buf) != 0:
        return False
    return int.from_bytes(buf.raw[:8], "little") == BPF_FS_MAGIC


def root_problem(root: str) -> str | None:
    """Why root cannot hold tenants' pins, None when it can: a bpffs directory that only root may write."""
    try:
        st = os.stat(root)
    except OSError as e:
        return e.strerror or str(e)
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if not is_bpffs(root):
        return "not on a bpf filesystem (mount -t bpf bpf DIR)"
    if st.st_uid != 0 or st.st_mode & 0o022:
        return "must be root's and not writable by group or others"
    return None


def _subdir(parent: int, name: str, uid: int, mode: int) -> int:
    """Open (making it if absent) parent/name as a directory owned by uid with mode, never through a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=parent)
    fd = os.open(name, _DIR, dir_fd=parent)  # ELOOP/ENOTDIR for a planted link or file
    try:
        st = os.fstat(fd)
        if st.st_uid != uid or stat.S_IMODE(st.st_mode) != mode:
            os.fchown(fd, uid, -1)
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def pin(root: str, uid: int, gid: int, ifname: str, map_fd: int) -> str:
    """Pin map_fd for uid; returns the path. FileExistsError when that pin is taken."""
    if "/" in ifname or ifname in (".", ".."):
        raise OSError(errno.EINVAL, f"bad interface name {ifname!r}")
    rootfd = os.open(root, _DIR)
    fds = [rootfd]
    try:
        staging = _subdir(rootfd, STAGING, os.geteuid(), 0o700)  # the broker's own, whatever uid it runs as
        fds.append(staging)
        fds.append(_subdir(rootfd, str(uid), uid, 0o700))
        fds.append(_subdir(fds[-1], ifname, uid, 0o700))
        here = fds[-1]
        path = os.path.join(root, str(uid), ifname, PIN_NAME)
        staged = _staged_name(uid, ifname)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged, dir_fd=staging)  # left by a broker that stopped here
        # BPF_OBJ_PIN takes a path: give it the directory we hold, by /proc/self/fd, which no link can redirect
        bpfsys.obj_pin(map_fd, f"/proc/self/fd/{staging}/{staged}")
        try:
            # chown by name only where no tenant can swap the name; the link never replaces a name (EEXIST)
            os.chown(staged, uid, gid, dir_fd=staging, follow_symlinks=False)
            os.link(staged, PIN_NAME, src_dir_fd=staging, dst_dir_fd=here, follow_symlinks=False)
        finally:
            os.unlink(staged, dir_fd=staging)
        return path
    finally:
        for fd in fds:
            os.close(fd)


def _staged_name(uid: int, ifname: str) -> str:
    return f"{uid}-{ifname}"


def unpin(root: str, uid: int, ifname: str) -> bool:
    """Remove a tenant's pin (and its interface directory when empty); False when it was not there."""
    try:
        rootfd = os.open(root, _DIR)
    except OSError:
        return False
    fds = [rootfd]
    with contextlib.suppress(OSError):
        staging = os.open(STAGING, _DIR, dir_fd=rootfd)
        fds.append(staging)
        os.unlink(_staged_name(uid, ifname), dir_fd=staging)  # a pin its broker stopped before it was given
    try:
        fds.append(os.open(str(uid), _DIR, dir_fd=rootfd))
        fds.append(os.open(ifname, _DIR, dir_fd=fds[-1]))
        os.unlink(PIN_NAME, dir_fd=fds[-1])
        with contextlib.suppress(OSError):
            os.rmdir(ifname, dir_fd=fds[-2])
        return True
    except OSError:
        return False
    finally:
        for fd in fds:
            os.close(fd)
