"""`xskbroker serve` refused or failed at start: nothing it made is left behind (the socket file a client would
find dead, the broker's threads)."""

from __future__ import annotations

import errno
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from xskbroker.broker import daemon
from xskbroker.broker.lifecycle import Lifecycle
from xskbroker.broker.serve_options import quick_parse

ROOT = Path(__file__).resolve().parents[2]
POLICY = 'version = 1\n[[allow]]\nname = "t"\nusers = [65534]\ninterfaces = ["xsk*"]\n'


def _args(tmp_path: Path, *more: str) -> list[str]:
    (tmp_path / "policy.toml").write_text(POLICY)
    return ["--socket", str(tmp_path / "broker.sock"), "--policy", str(tmp_path / "policy.toml"), "--state-dir",
            str(tmp_path / "state"), "--audit", "json", "--no-split-cpus", *more]


def test_a_pin_root_refused_leaves_no_socket_file(tmp_path: Path) -> None:
    """--pin-root was judged after the socket file was made, and the refusal returned without removing it."""
    (tmp_path / "pins").mkdir()  # not bpffs
    done = subprocess.run([sys.executable, "-m", "xskbroker.broker", "serve",
                           *_args(tmp_path, "--pin-root", str(tmp_path / "pins"))],
                          capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and "not on a bpf filesystem" in done.stderr, done.stderr
    assert not (tmp_path / "broker.sock").exists()


def test_a_start_that_fails_at_recovery_leaves_no_socket_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery rewrites the lease journal: on a full /run it raises, and the start ended with the socket file made
    (and the service's threads) left behind."""
    def full(self: Lifecycle) -> list[object]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Lifecycle, "recover", full)
    args = quick_parse(_args(tmp_path))
    assert args is not None
    before = set(threading.enumerate())
    with pytest.raises(OSError, match="No space"):
        daemon.serve(args)  # type: ignore[arg-type]
    assert not (tmp_path / "broker.sock").exists()
    for t in set(threading.enumerate()) - before:
        t.join(5)
        assert not t.is_alive(), t
