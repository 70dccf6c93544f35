"""Dropping root for good: to one uid, gid and group list, no new privileges, and no capability left.

Imported before the drop: after it, modules under a 0700 home (a source checkout) cannot be loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from xskbroker.common.libc import PR_SET_NO_NEW_PRIVS, errno_error, libc
from xskbroker.common.procfs import status_fields


def drop_to(uid: int, gid: int, groups: Iterable[int] = ()) -> dict[str, str]:
    """Become uid/gid with exactly `groups` as supplementary groups, irreversibly; returns the Cap* lines
    of /proc/self/status afterwards. Raises PermissionError if a capability survived (unless uid is 0)."""
    os.setgroups(list(groups))
    os.setresgid(gid, gid, gid)  # the gid first: once the uid is dropped, changing it is not allowed
    os.setresuid(uid, uid, uid)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise errno_error("prctl(PR_SET_NO_NEW_PRIVS)")
    with open("/proc/self/status") as f:
        caps = {k: v for k, v in status_fields(f.read()).items() if k.startswith("Cap")}
    if uid != 0 and any(int(caps.get(k, "1"), 16) for k in ("CapEff", "CapPrm")):  # no line: not proven gone
        raise PermissionError(f"capabilities left after dropping to uid {uid}: {caps}")
    return caps
