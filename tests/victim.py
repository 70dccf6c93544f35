"""A file root must not be tricked into touching: for the tests of links planted where root writes or chmods."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SECRET = "root:$y$precious-hash:19000:0:99999:7:::\n"  # stands for /etc/shadow


@pytest.fixture
def victim() -> Iterator[Path]:
    """A root-owned file with content, in a root-only directory (like /etc/shadow)."""
    d = Path(tempfile.mkdtemp(prefix="xsk-victim-"))
    path = d / "shadow"
    path.write_text(SECRET)
    path.chmod(0o600)
    yield path
    shutil.rmtree(d, ignore_errors=True)
