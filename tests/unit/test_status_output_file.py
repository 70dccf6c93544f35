"""`xskbroker status --output FILE` as root (the metrics timer of docs/systemd.md) into a directory another
uid can write (node_exporter's textfile directory, prometheus's): that uid must not aim root's chmod anywhere."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

from xskbroker.client import cli
from xskbroker.testbed.sandbox import spawn_unprivileged

from ..victim import SECRET, victim

__all__ = ["victim"]  # a fixture

ATTACKER = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


def swap_for_link(tmp: str, target: str) -> dict[str, Any]:
    """What the directory's owner does on seeing the temp file appear (inotify): move it, plant a link."""
    os.rename(tmp, tmp + ".moved")
    os.symlink(target, tmp)
    return {"uid": os.getuid()}


def test_a_temp_file_swapped_for_a_link_is_not_chmodded_through(victim: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    base = Path(tempfile.mkdtemp(prefix="xsko-"))
    try:
        base.chmod(0o755)
        textfile = base / "node-exporter"  # another uid's directory, as /var/lib/prometheus/node-exporter is
        textfile.mkdir()
        os.chown(textfile, ATTACKER, ATTACKER)
        real_mkstemp = tempfile.mkstemp

        def mkstemp_then_swap(*args: Any, **kwargs: Any) -> tuple[int, str]:
            fd, tmp = real_mkstemp(*args, **kwargs)
            spawn_unprivileged(swap_for_link, tmp, str(victim), uid=ATTACKER).result()
            return fd, tmp

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_swap)
        out = textfile / "xskbroker.prom"
        with contextlib.suppress(OSError):  # refusing is fine; following the link is not
            cli._replace_file(str(out), "xskbroker_up 1\n")
        assert stat.S_IMODE(victim.stat().st_mode) == 0o600
        assert victim.read_text() == SECRET
    finally:
        shutil.rmtree(base, ignore_errors=True)
