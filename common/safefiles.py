"""State files of a privileged process (the broker's lease journal, the libvirt hook's state and logs).

They live in a directory of the process's own that nobody else may write, and are opened so that an
entry planted there before (a symlink or hard link to some other file) is never followed: a root process
that opened `dir/x.tmp` with O_TRUNC through a planted link would truncate the link's target.
"""

from __future__ import annotations

import errno
import os
import stat

from xskbroker.policy import trust

__all__ = ["UnsafePathError", "create_new", "private_dir", "private_opener", "read_private"]

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(OSError):
    """A state directory or file that cannot be used safely; the message names it and the fix."""


def private_dir(path: str) -> None:
    """Make `path` a directory of this euid that no one else can write: created 0700; an existing one
    must be ours (a group/world write bit is then removed) and not a symlink, and the directories
    above it must be root's or ours and not writable by others (sticky ones, like /tmp, excepted)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    except OSError as e:
        link = os.path.islink(path)  # O_DIRECTORY|O_NOFOLLOW on a link fails with ENOTDIR
        why = "a symbolic link (refused: it could point anywhere)" if link else e.strerror or str(e)
        raise UnsafePathError(f"state directory {path}: {why}") from None
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.geteuid():
            raise UnsafePathError(f"state directory {path}: owned by uid {st.st_uid}, mode {mode:04o}, not by "
                                  f"this process's uid {os.geteuid()}: someone else controls what is in it "
                                  f"(fix: remove it, or use a directory of this uid)")
        if mode & 0o022:
            if mode & stat.S_ISVTX:
                raise UnsafePathError(f"state directory {path}: mode {mode:04o} is shared (sticky and "
                                      "group/world-writable, like /tmp): use a private directory")
            os.fchmod(fd, mode & ~0o022)  # ours: close it to others rather than refuse
    finally:
        os.close(fd)
    problems = trust.dir_chain_problems(path)
    if problems:
        raise UnsafePathError(f"state directory {path}: " + "; ".join(problems))


def create_new(path: str, mode: int = 0o600) -> int:
    """A new file at `path`, opened for writing. Whatever was there (a crash's leftover, a planted link)
    is unlinked first, which removes the entry and never its target."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
    try:
        return os.open(path, flags, mode)
    except FileExistsError:
        os.unlink(path)
        return os.open(path, flags, mode)


def _owned(fd: int, owner: int) -> bool:
    st = os.fstat(fd)
    # nlink: a hard link to another file would share its inode, whoever's it is
    return stat.S_ISREG(st.st_mode) and st.st_uid == owner and st.st_nlink == 1


def private_opener(path: str, flags: int, owner: int | None = None) -> int:
    """An opener for open(): never through a link, and only our own regular file, or uid `owner`'s (else
    UnsafePathError, an OSError); a file it creates is 0600."""
    owner = os.geteuid() if owner is None else owner
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | _NOFOLLOW, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"{path}: is a symbolic link: refused (remove it)") from None
        raise
    if not _owned(fd, owner):
        os.close(fd)
        raise UnsafePathError(f"{path}: not a regular file of uid {owner} with one link: refused (remove it)")
    return fd


def read_private(path: str, owner: int | None = None) -> bytes | None:
    """The content of our own regular file at `path` (or uid `owner`'s: a root reader of another uid's state),
    or None if there is none (a link or someone else's file counts as none: it is not ours to believe)."""
    try:
        with open(path, "rb", opener=lambda p, flags: private_opener(p, flags, owner)) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, UnsafePathError):
        return None
