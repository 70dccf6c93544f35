"""Audit records: every decision and lifecycle event as one structured record."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO


class JsonAudit:
    """One JSON object per line: each decision, plus lifecycle events."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream

    def __call__(self, record: dict[str, Any]) -> None:
        line = json.dumps({"ts": round(time.time(), 6), **record}, separators=(",", ":"), default=str)
        self.stream.write(line + "\n")
        self.stream.flush()
