"""The client package never imports privileged code: nothing under broker/ may load with it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import client

ROOT = Path(__file__).resolve().parents[2]
REPORT = "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('broker',)))"


def _broker_modules_loaded_by(imports: str) -> str:
    # A fresh interpreter: this test process may already have broker modules loaded by other tests.
    proc = subprocess.run([sys.executable, "-c", f"{imports}; {REPORT}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_client_modules_import_nothing_from_broker() -> None:
    loaded = _broker_modules_loaded_by(
        "import client.grant, client.cli, client.protocol, client.xsk, client.connection")
    assert loaded == "[]", f"the client package pulled in privileged modules: {loaded}"


def test_every_client_module_imports_nothing_from_broker() -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(client.__path__, "client."))
    assert "client.protocol" in names
    loaded = _broker_modules_loaded_by("import " + ", ".join(names))
    assert loaded == "[]", f"the client package pulled in privileged modules: {loaded}"
