"""Byte sizes as policy files and the CLI write them: 16777216, "16MiB", "16M", "512 KiB"."""

from __future__ import annotations

import re

# Binary units only: "M" meaning 10**6 in one place and 2**20 in another is how limits go wrong.
_KIB, _MIB, _GIB = 1 << 10, 1 << 20, 1 << 30
_UNITS = {"": 1, "B": 1, "K": _KIB, "KiB": _KIB, "M": _MIB, "MiB": _MIB, "G": _GIB, "GiB": _GIB}
_SIZE_RE = re.compile(r"([0-9]+)\s*([A-Za-z]*)")


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string with an optional B/KiB/MiB/GiB (or K/M/G) suffix.

    Raises ValueError for anything else, including negative numbers and booleans; zero is
    accepted here (a request may ask for nothing) and rejected by the loader where a limit is meant.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a size (bytes, or a string like '16MiB'), got {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    m = _SIZE_RE.fullmatch(value.strip())
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"bad size {value!r}: use bytes or a number with B, KiB, MiB, GiB (or K, M, G)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def size_arg(text: str) -> int:
    """parse_size for argparse's type=: a bad size is a usage error."""
    try:
        return parse_size(text)
    except ValueError as e:
        import argparse  # only for the usage error: serve's start-up reads its options without argparse

        raise argparse.ArgumentTypeError(str(e)) from None


def format_size(n: int) -> str:
    """The largest exact binary unit: 16777216 -> "16 MiB", 1000 -> "1000 B"."""
    for suffix, unit in (("GiB", _GIB), ("MiB", _MIB), ("KiB", _KIB)):
        if n and n % unit == 0:
            return f"{n // unit} {suffix}"
    return f"{n} B"
