"""`xskbroker` command line: one entry point, subcommands imported only when used.

Consumer-side commands (request, status) load only the client package; serve and demo load the
privileged code.
"""

from __future__ import annotations

import gc
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


def build_parser(only_serve: bool = False) -> argparse.ArgumentParser:
    """Every command's parser; with ONLY_SERVE just `serve`'s, which then imports no other command's module
    (a socket-activated start pays for every import before its first grant)."""
    from xskbroker.broker.parser import build_parser as build

    return build(_serve, _demo, only_serve)


def _serve(args: argparse.Namespace) -> int:
    from xskbroker.broker.daemon import serve
    return serve(args)


def _demo(args: argparse.Namespace) -> int:
    from xskbroker.testbed.demo import main
    return main(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # start-up allocates thousands of long-lived objects (modules, classes, the policy) and no garbage worth
        # a collection: collecting them meanwhile only delays a socket-activated first grant (serve freezes
        # them out of the collector's sight, then turns it back on, before it says READY)
        gc.disable()
    try:
        if argv[:1] == ["serve"]:
            from xskbroker.broker.serve_options import quick_parse

            plain = quick_parse(argv[1:])  # a unit's plain command line, without argparse (~4 ms of a cold start)
            if plain is not None:
                return int(_serve(plain) or 0)  # type: ignore[arg-type]  # the namespace argparse would give
        args = build_parser(only_serve=argv[:1] == ["serve"]).parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    finally:
        gc.enable()  # a serve that never got to READY (or a caller of main in-process) has it back


if __name__ == "__main__":
    sys.exit(main())
