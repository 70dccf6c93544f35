"""Fixtures shared by the unit tests: `rig`, the service against service_rig.py's fake kernel, closed after."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from .service_rig import Rig, make_rig


@pytest.fixture
def rig(tmp_path: Path) -> Iterable[Rig]:
    r = make_rig(tmp_path)
    yield r
    r.service.close()
