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
                     "subprocess",
                     # nor what only a configured or later feature needs: the device-plugin endpoint, the UMEM
                     # pool's preparer (after the first grant), QEMU's QMP, the version lookup, a bug's traceback
                     "xskbroker.broker.dpendpoint", "xskbroker.broker.dpsocket", "xskbroker.wire.deviceplugin",
                     "xskbroker.broker.preparer", "xskbroker.client.qmp", "xskbroker.client.hotplug",
                     "importlib.metadata", "traceback", "hypothesis",
                     # nor stdlib modules that cost milliseconds and that serve has no use for: shutil (with bz2
                     # and lzma) came with argparse's terminal width, pathlib (with urllib.parse, fnmatch)
                     "shutil", "pathlib", "tempfile", "logging", "asyncio", "concurrent.futures", "multiprocessing",
                     # argparse (with gettext and locale: ~4 ms with serve's parser) reads only a command line that
                     # is not plain (broker/serve_options.py)
                     "argparse", "gettext", "locale",
                     # dataclasses brings inspect, ast, tokenize (11-16 ms) and compiles several functions per class:
                     # the package's records are common.records'
                     "dataclasses", "inspect", "ast")

# what the interpreter had loaded before (an editable install's import hook brings pathlib) is not serve's
PROBE = """
import json, sys
before = set(sys.modules)
from xskbroker.broker import cli
cli._serve = lambda args: 0  # parse as serve would, without serving
assert cli.main(["serve", "--policy", "/nonexistent"]) == 0
import xskbroker.broker.daemon, xskbroker.broker.bpf
xskbroker.broker.bpf.libbpf(), xskbroker.broker.bpf.libxdp()
print(json.dumps(sorted(set(sys.modules) - before)))
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
