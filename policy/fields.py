"""The values of a policy rule's keys: each checked and converted by its own parser (FIELDS, by key).

A parser raises Invalid with what is wrong with the value; the loader adds the file, the line and the rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from .model import KINDS, QueueSet
from .sizes import parse_size

_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL")
_IFNAMSIZ = 16  # includes the NUL, so names have at most 15 characters
_RANGE_RE = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")
# A number written as a string ("0-3", "1000") is bounded as TOML bounds integers (the loader refuses bigger ones):
# int() of 4301 digits raises ValueError, which crashed the loader, or decide() reading a group entry as a gid
MAX_NUMBER = (1 << 63) - 1


class Invalid(Exception):
    """A value failed validation; the caller adds file, line and rule."""


def _principals(value: Any, what: str) -> frozenset[str]:
    if not isinstance(value, list):
        raise Invalid(f'must be a list of {what} names or numeric ids, e.g. ["xsk", 1000], or ["*"]')
    out: set[str] = set()
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            out.add(str(item))
        elif isinstance(item, str) and item and item.strip() == item and item.isprintable():
            if item.isascii() and item.isdigit() and _number(item) is None:  # decide reads it as a number
                raise Invalid(f"bad {what} {item[:20]!r}...: a numeric id is at most {MAX_NUMBER}")
            out.add(item)
        else:
            raise Invalid(f'bad {what} {item!r}: use a name, a non-negative numeric id, or "*"')
    return frozenset(out)


def _number(digits: str) -> int | None:
    """The number ASCII digits spell if it is at most MAX_NUMBER, else None (never int() of thousands of digits)."""
    n = int(digits) if len(digits.lstrip("0")) <= 19 else MAX_NUMBER + 1
    return n if n <= MAX_NUMBER else None


def _cgroups(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise Invalid('must be a non-empty list of cgroup v2 paths or globs, e.g. ["/machine.slice/machine-qemu*"]')
    for item in value:
        if not isinstance(item, str) or not item.startswith("/") or not item.isprintable():
            raise Invalid(f"bad cgroup {item!r}: use an absolute cgroup v2 path or glob, as /proc/PID/cgroup's "
                           '"0::" line shows it, e.g. "/system.slice/vm-a.service"')
        parts = item.split("/")[1:]
        if item != "/" and any(p in ("", ".", "..") for p in parts):
            raise Invalid(f"bad cgroup {item!r}: no empty, '.' or '..' parts and no trailing '/' (the kernel "
                           "never prints them, so it could match no peer)")
    return tuple(value)


def _patterns(value: Any, example: str, bad: str) -> tuple[str, ...]:
    """A non-empty list of names or fnmatch globs, each one printable word."""
    if not isinstance(value, list) or not value:
        raise Invalid(f"must be a non-empty list of {example}")
    for item in value:
        if not isinstance(item, str) or not item or not item.isprintable() or any(c.isspace() for c in item):
            raise Invalid(f"bad {bad.format(item=repr(item))}")
    return tuple(value)


def _labels(value: Any) -> tuple[str, ...]:
    return _patterns(value, 'LSM labels or globs, e.g. ["system_u:system_r:svirt_t:*"]',
                     "label {item}: use an LSM label (SO_PEERSEC) or an fnmatch glob")


def _interfaces(value: Any) -> tuple[str, ...]:
    names = _patterns(value, 'interface names or globs, e.g. ["veth*", "eth1"]',
                      "interface {item}: use an interface name or an fnmatch glob")
    for item in names:
        if not any(c in item for c in "*?[") and len(item) >= _IFNAMSIZ:
            raise Invalid(f"interface {item!r} is longer than 15 characters, so no interface can match it")
    return names


def _queues(value: Any) -> QueueSet:
    if not isinstance(value, list) or not value:
        raise Invalid('must be a non-empty list of queue ids and "a-b" ranges, e.g. ["0-3", 7]')
    ranges: list[tuple[int, int]] = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            if item < 0:
                raise Invalid(f"queue {item} is negative")
            ranges.append((item, item))
            continue
        m = _RANGE_RE.fullmatch(item) if isinstance(item, str) else None
        if m is None:
            raise Invalid(f'bad queue {item!r}: use a non-negative integer or an "a-b" range')
        lo = _number(m.group(1))
        hi = _number(m.group(2)) if m.group(2) is not None else lo
        if lo is None or hi is None:
            raise Invalid(f"bad queue {item[:20]!r}...: a queue id is at most {MAX_NUMBER}")
        if lo > hi:
            raise Invalid(f"range {item!r} runs backwards (start > end)")
        ranges.append((lo, hi))
    return QueueSet(tuple(ranges))


def _kinds(value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise Invalid(f"must be a non-empty list drawn from {', '.join(KINDS)}")
    for item in value:
        if item not in KINDS:
            raise Invalid(f"unknown kind {item!r} (known: {', '.join(KINDS)})")
    return frozenset(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise Invalid(f"must be a positive integer, got {value!r}")
    return value


def _umem(value: Any) -> int:
    try:
        size = parse_size(value)
    except ValueError as e:
        raise Invalid(str(e)) from None
    if size <= 0:
        raise Invalid("must be more than zero bytes (omit it for the default)")
    return size


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {value!r}")
    return value


def _name(value: Any) -> str:
    # Names end up in audit logs and replies, so keep them to one printable line.
    if not isinstance(value, str) or not value or not value.isprintable():
        raise Invalid(f"must be a non-empty string, got {value!r}")
    return value


FIELDS: dict[str, Callable[[Any], Any]] = {
    "name": _name,
    "users": lambda v: _principals(v, "user"),
    "groups": lambda v: _principals(v, "group"),
    "cgroups": _cgroups,
    "labels": _labels,
    "interfaces": _interfaces,
    "queues": _queues,
    "kinds": _kinds,
    "max_queues": _positive_int,
    "max_umem": _umem,
    "exclusive": _bool,
    "raise_memlock": _umem,
    "max_connections": _positive_int,
    "max_requests_per_second": lambda v: _rate(v),
    "revoke_signal": lambda v: _signal(v),
}


def _rate(value: Any) -> float:
    # TOML floats include nan (which passed "<= 0" and then limited nothing) and inf (no limit, spelled as one)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise Invalid(f"must be a positive number of requests per second, got {value!r}")
    return float(value)


def _signal(value: Any) -> str | None:
    if value in ("none", ""):
        return None
    if value not in _SIGNALS:
        raise Invalid(f"must be one of {', '.join(_SIGNALS)} or \"none\", got {value!r}")
    return str(value)
