"""argparse types the client's commands share: a count or a queue id is read as such, or the command line is a
usage error (exit 2) naming the option, before any broker is asked."""

from __future__ import annotations

import argparse
import math

from xskbroker.wire.protocol import MAX_QUEUES


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


def queue_count(text: str) -> int:
    """A grant's number of queues: 1 to the codec's MAX_QUEUES (a huge count once built a range of that many ids
    before the codec could refuse it, and ended in a MemoryError)."""
    value = positive(text)
    if value > MAX_QUEUES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_QUEUES} (the most one grant holds), not {value}")
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


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, not {text}")
    return value


def timeout(text: str) -> float:
    """Seconds to wait: more than 0 and finite (socket.settimeout raised on a negative or nan one)."""
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def duration(text: str) -> float:
    """Seconds to wait that may be none: 0 or more, finite (time.sleep raised on inf)."""
    value = _seconds(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 seconds or more, not {text}")
    return value
