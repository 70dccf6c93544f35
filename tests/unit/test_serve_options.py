"""serve's plain parse (no argparse on a socket-activated start) gives argparse's namespace, or leaves it
to argparse."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from xskbroker.broker import cli
from xskbroker.broker.serve_options import options, quick_parse


def _argparse(args: list[str]) -> dict[str, object] | None:
    """What serve's argparse parser makes of ARGS; None when it refuses them (a usage error)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            ns = cli.build_parser(only_serve=True).parse_args(["serve", *args])
    except SystemExit:
        return None
    out = vars(ns)
    del out["func"]
    return out


UNIT_LINES = [
    [],
    ["--policy", "/etc/xskbroker/policy.toml", "--idle-timeout", "60"],
    ["--policy=/p.toml", "--idle-timeout=0.5", "--socket", "/run/x.sock", "--socket-mode", "0600"],
    ["--socket-group", "xskbroker", "--state-dir", "/run/s", "--umem-pool", "16MiB", "--xdp-mode", "skb"],
    ["--pin-root", "/sys/fs/bpf/x", "--max-connections", "8", "--audit", "json", "--no-split-cpus"],
    ["--split-cpus", "--accept-passed-fds", "--umem-pool=0", "--xdp-mode=native"],
    ["--device-plugin", "interface=eth1,user=1000", "--device-plugin=interface=eth2,user=1001,queues=0-3"],
    ["--policy", "/a", "--policy", "/b"],  # the last one counts, as with argparse
]

# spellings argparse must read itself: help, abbreviations, bad values, unknown options, values that look like
# options, an option given a value it takes none of
LEFT_TO_ARGPARSE = [
    ["-h"], ["--help"], ["--pol", "/p"], ["--idle-timeout", "0"], ["--idle-timeout", "-5"], ["--socket-mode", "9"],
    ["--umem-pool", "3X"], ["--xdp-mode", "fast"], ["--bogus"], ["--policy"], ["--policy", "--idle-timeout"],
    ["--split-cpus=yes"], ["--no-split-cpus=1"], ["--no-policy"], ["stray"], ["--max-connections", "many"],
    ["--device-plugin", "nonsense"], ["--", "--policy", "/p"],
]


def test_a_units_plain_command_lines_read_as_argparse_reads_them() -> None:
    for args in UNIT_LINES:
        quick = quick_parse(args)
        assert quick is not None, args
        assert vars(quick) == _argparse(args), args


def test_everything_else_is_left_to_argparse() -> None:
    for args in LEFT_TO_ARGPARSE:
        assert quick_parse(args) is None, args


FLAGS = [flag for flag, _ in options()] + ["--no-split-cpus", "--pol", "-h"]
VALUES = ["/p", "60", "0660", "0", "-1", "16MiB", "auto", "skb", "json", "xskbroker", "interface=eth1,user=1000", "x"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(VALUES),
                          st.builds(lambda f, v: f"{f}={v}", st.sampled_from(FLAGS), st.sampled_from(VALUES))),
                max_size=6))
def test_whatever_it_reads_argparse_reads_the_same(args: list[str]) -> None:
    quick = quick_parse(args)
    if quick is not None:
        assert vars(quick) == _argparse(args)


def test_main_serves_a_plain_command_line_without_importing_argparse() -> None:
    probe = ("import json, sys\nfrom xskbroker.broker import cli\nseen = []\n"
             "cli._serve = lambda args: seen.append(vars(args)) or 0\n"
             "code = cli.main(['serve', '--policy', '/p.toml', '--idle-timeout', '60'])\n"
             "print(json.dumps([code, 'argparse' in sys.modules, seen[0]['policy'], seen[0]['idle_timeout']]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == [0, False, "/p.toml", 60.0]
