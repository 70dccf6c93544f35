"""The kernel's rule for interface names (net/core/dev.c dev_valid_name), pure.

A name the kernel would never give an interface must never reach a policy glob or a name lookup:
"eth0:1" matches "eth*" and the ioctl paths cut it at ':' to "eth0" (old alias syntax), so a deny on
eth0 would be judged on one name and the kernel would act on another.
"""

from __future__ import annotations

IFNAMSIZ = 16  # with the terminating NUL: 15 bytes of name at most


def ifname_problem(name: str) -> str | None:
    """Why `name` cannot be a real interface's name, or None when it can."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:  # a lone surrogate: no name, and a lookup would raise
        return "it is not valid UTF-8"
    if size == 0:
        return "it is empty"
    if size >= IFNAMSIZ:
        return f"it is {size} bytes long; the kernel allows {IFNAMSIZ - 1}"
    if name in (".", ".."):
        return "'.' and '..' are not interface names"
    for c in name:
        if c in "/:\0" or c.isspace():
            return f"it contains {c!r}, which the kernel forbids in interface names"
    return None
