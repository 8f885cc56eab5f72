"""``--plugin MODULE``: modules outside the project that register backbones and dataset formats.

The modules are imported before an entry point builds its parser, so the backbones, their options
and the formats they register appear among its choices and flags.
"""
import argparse
import importlib
import sys
from typing import List, Optional, Sequence


def add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (repeatable): it may register backbones and dataset formats")


def import_plugins(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Import the ``--plugin`` modules named in ``argv`` before the full parser is built, so their
    backbones, options and formats show up in it. Returns the module names."""
    pre = argparse.ArgumentParser(add_help=False)
    add_plugin_flag(pre)
    known, _ = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    for module in known.plugin:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise SystemExit(f"error: --plugin {module}: {exc}") from None
    return list(known.plugin)
