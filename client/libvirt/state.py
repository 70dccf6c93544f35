"""The hook's files per domain in its state directory: DOMAIN.json (what the worker did: its pid, QEMU's, the
leases) and DOMAIN.log. Root's own files, never followed through a link: the hook signals the pids they name."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from typing import IO, Any
from urllib.parse import quote

from xskbroker.common import safefiles


def domain_file(state_dir: str, domain: str, suffix: str) -> str:
    """state_dir/DOMAIN.suffix, with the name quoted so that no domain name can leave the directory."""
    return os.path.join(state_dir, quote(domain, safe="") + suffix)


def read_state(path: str) -> dict[str, Any] | None:
    try:  # never through a link, and only root's own file: its pids get signalled
        state = json.loads(safefiles.read_private(path) or b"null")
    except ValueError:
        return None
    return state if isinstance(state, dict) else None


def write_state(path: str, state: Mapping[str, Any]) -> None:
    """Atomically (a reader sees the old or the new file), readable by root only."""
    tmp = f"{path}.tmp"
    with os.fdopen(safefiles.create_new(tmp), "w") as f:  # a link planted at the temp name is unlinked
        json.dump(state, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


class Log:
    """Timestamped lines for DOMAIN.log."""

    def __init__(self, stream: IO[str], domain: str) -> None:
        self.stream, self.domain = stream, domain

    def __call__(self, text: str) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(f"{stamp} xskbroker-libvirt[{os.getpid()}] {self.domain}: {text}\n")
            self.stream.flush()
