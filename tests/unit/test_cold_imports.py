"""What a socket-activated `xskbroker serve` imports before its first grant: every module is paid for by the
client whose connection started it (issue 13, cold start). Commands it does not run stay unimported."""

from __future__ import annotations

import json
import subprocess
import sys

# `serve` parses its arguments and imports the daemon; the other commands' modules, and what only they use,
# must not come with it. ctypes.util runs ldconfig in a child to find a library (~17 ms).
NOT_ON_SERVE_PATH = ("xskbroker.broker.doctor", "xskbroker.broker.doctor_probes", "xskbroker.client.cli",
                     "xskbroker.client.qmp_cli", "xskbroker.policy.cli", "xskbroker.testbed", "ctypes.util",
                     "subprocess")

PROBE = """
import json, sys
from xskbroker.broker import cli
cli._serve = lambda args: 0  # parse as serve would, without serving
assert cli.main(["serve", "--policy", "/nonexistent"]) == 0
import xskbroker.broker.daemon, xskbroker.broker.bpf
xskbroker.broker.bpf.libbpf(), xskbroker.broker.bpf.libxdp()
print(json.dumps(sorted(sys.modules)))
"""


def test_serve_imports_no_other_commands_module() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    assert "xskbroker.broker.daemon" in loaded
    assert sorted(loaded.intersection(NOT_ON_SERVE_PATH)) == []


def test_every_command_is_still_there() -> None:
    from xskbroker.broker.cli import build_parser

    text = build_parser().format_help()
    for command in ("serve", "request", "status", "policy", "doctor", "demo"):
        assert command in text
    assert "serve" in build_parser(only_serve=True).format_help()
