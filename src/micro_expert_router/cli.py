"""``mer``: the command-line shell over the library.

Each subcommand lives in ``commands/<name>.py`` and provides ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Command modules import heavy libraries
(torch) inside ``run`` so that ``mer --help`` stays fast. Errors a user can fix (``MERError``)
are printed as one line and exit non-zero, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MERError

# Order is the order shown by ``mer --help``.
COMMANDS = ["generate", "chat", "serve", "convert", "inspect", "verify", "sim", "plan"]


def _available_commands() -> dict[str, object]:
    mods = {}
    for name in COMMANDS:
        try:
            mods[name] = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.commands.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mer",
        description="Micro-Expert-Router: run MoE models larger than RAM, streaming experts "
        "from disk.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, mod in _available_commands().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MERError as e:
        print(f"mer {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"mer {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
