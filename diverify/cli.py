"""The ``diverify`` command line: parse, call, print.

Each subcommand lives in ``diverify/commands/<name>.py`` and exports
``register(subparsers)`` (adds its parser and sets ``func``); every module in
that package is a subcommand. Heavy imports (jax, the models) happen inside
the handlers so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import diverify.commands

from diverify import compile_cache
from diverify.errors import DiverifyError

#: The order in which ``--help`` lists the subcommands; any other module follows.
ORDER = ("certify", "radius", "bounds", "embed", "lipschitz", "cws", "certify-edit",
         "audit", "dna", "dis", "train-denoiser")


def command_modules() -> list[str]:
    """Names of the modules in :mod:`diverify.commands`, in ``--help`` order."""
    names = [m.name for m in pkgutil.iter_modules(diverify.commands.__path__) if not m.name.startswith("_")]
    rank = {name.replace("-", "_"): i for i, name in enumerate(ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))

DESCRIPTION = """\
diverify: certify that a generative model's text encoder or denoiser cannot be
steered into a forbidden region by a trigger. Every number it prints is either
a sound bound (a certificate) or an explicitly labelled empirical estimate.

Compiled bound programs are cached on disk (~/.cache/diverify/xla; set
DIVERIFY_CACHE_DIR to move it, or to "off"), so a second run of the same
problem shape skips most of XLA's compilation.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diverify",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f"diverify.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    compile_cache.enable_from_environment()
    try:
        return int(args.func(args) or 0)
    except DiverifyError as err:
        print(f"diverify {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
