"""argparse types the client's commands share: a count or a queue id is read as such, or the command line is a
usage error (exit 2) naming the option, before any broker is asked."""

from __future__ import annotations

import argparse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def non_negative(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def power_of_two(text: str) -> int:
    value = _int(text)
    if value < 1 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two (e.g. 2048), not {value}")
    return value
