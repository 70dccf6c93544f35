"""Whether a file that grants privileges may be believed: sshd's StrictModes for the policy and its kin.

A file is trusted only if root (or the process's own euid, so unprivileged runs and tests work) owns
it and no group or other user may write it, and the same holds for every directory above it up to /.
A group/world-writable directory is acceptable only when it is sticky (like /tmp): then only an
entry's owner may rename or remove it, and that owner is checked too.
"""

from __future__ import annotations

import os
import stat

__all__ = ["dir_chain_problems", "fix_hint", "problem", "trusted_uids"]


def trusted_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _owner(uid: int) -> str:
    import pwd  # only for error messages

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def fix_hint(path: str, st: os.stat_result) -> str:
    if st.st_uid not in trusted_uids():
        return f"chown root {path} (and chmod go-w {path})"
    return f"chmod go-w {path}"


def problem(path: str, st: os.stat_result, *, parent: bool = False) -> str | None:
    """Why `st` (of `path`) may not be trusted, or None. `parent`: it is a directory above the file."""
    mode = stat.S_IMODE(st.st_mode)
    what = f"owned by {_owner(st.st_uid)}, mode {mode:04o}"
    if st.st_uid not in trusted_uids():
        who = "root" if os.geteuid() == 0 else f"root or uid {os.geteuid()}"
        return f"{path}: unsafe: {what}: only {who} may own it, as its owner can rewrite it " \
               f"(fix: {fix_hint(path, st)})"
    if mode & 0o022 and not (parent and stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX):
        return f"{path}: unsafe: {what}: group/world-writable, so other users can rewrite it " \
               f"(fix: {fix_hint(path, st)})"
    return None


def _ancestors(path: str) -> list[str]:
    out: list[str] = []
    here = os.path.dirname(path)
    while True:
        out.append(here)
        up = os.path.dirname(here)
        if up == here:
            return out
        here = up


# the kernel's own limit on the links one path resolution follows (past it, the open fails with ELOOP)
MAX_LINKS = 40


def _links(path: str) -> list[str]:
    """Each symbolic link that resolving the absolute `path` passes through, in order, named where it is (its
    directory resolved): the middle of a chain as well as its ends. Stops where a name is missing or unreadable
    (the open reports that) or after MAX_LINKS links."""
    links: list[str] = []
    here, pending = "/", path.split("/")
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            here = os.path.dirname(here)
            continue
        at = os.path.join(here, part)
        try:
            st = os.lstat(at)
            if not stat.S_ISLNK(st.st_mode):
                here = at
                continue
            target = os.readlink(at)
        except OSError:
            return links
        links.append(at)
        if len(links) > MAX_LINKS:
            return links
        if target.startswith("/"):
            here = "/"
        pending = target.split("/") + pending
    return links


def _link_problem(link: str) -> str | None:
    """Why the link itself may not be trusted: in a sticky directory others may write, its owner may replace it."""
    try:
        st = os.lstat(link)
        parent = os.stat(os.path.dirname(link))
    except OSError:
        return None  # gone since: the open reports what is missing
    if stat.S_IMODE(parent.st_mode) & 0o022 and st.st_uid not in trusted_uids():
        return (f"{link}: unsafe: a symbolic link owned by {_owner(st.st_uid)} in a directory others may write: "
                f"its owner can point it elsewhere (fix: replace it with one of root's, or link straight to the file)")
    return None


def dir_chain_problems(path: str, seen: set[str] | None = None) -> list[str]:
    """Problems of the directories above `path` up to /: as written, with symlinks resolved, and above every
    link in between (whoever can write any of them could swap what the path names: a link in the middle of a
    chain redirects it as well as the first does). `seen` skips directories checked already."""
    seen = set() if seen is None else seen
    errors: list[str] = []
    absolute = os.path.abspath(path)
    links = _links(absolute)
    for link in links:
        if link not in seen:
            seen.add(link)
            found = _link_problem(link)
            if found:
                errors.append(found)
    above_links = [d for link in links for d in _ancestors(link)]
    for d in [*_ancestors(absolute), *_ancestors(os.path.realpath(absolute)), *above_links]:
        if d in seen:
            continue
        seen.add(d)
        try:
            st = os.stat(d)
        except FileNotFoundError:
            continue  # the file's own read reports what is missing
        except OSError as e:
            errors.append(f"{d}: cannot check: {e.strerror or e}")
            continue
        found = problem(d, st, parent=True)
        if found:
            errors.append(found)
    return errors
