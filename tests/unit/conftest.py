"""Fixtures shared by the unit tests: `rig`, the service against service_rig.py's fake kernel, closed after; `home`,
a private directory holding a good policy file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from .service_rig import Rig, make_rig

GOOD = 'version = 1\n[[allow]]\nname = "a"\nusers = ["*"]\ninterfaces = ["eth1"]\n'


@pytest.fixture
def rig(tmp_path: Path) -> Iterable[Rig]:
    r = make_rig(tmp_path)
    yield r
    r.service.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A private directory (like /etc/xskbroker: 0755, ours) holding a good policy.toml."""
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    (d / "policy.toml").write_text(GOOD)
    (d / "policy.toml").chmod(0o644)
    return d
