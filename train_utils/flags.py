"""Command-line helpers shared by every entry point, with no heavy imports: the help format, list
flags, and ``--plugin MODULE`` (modules outside the project that register backbones and dataset
formats; they are imported before an entry point builds its parser, so what they register appears
among its choices and flags).
"""
import argparse
import importlib
import sys
from typing import Any, List, Optional, Sequence


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only when there is a default and the help does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text or not text:
            return text
        return super()._get_help_string(action)


class ListAction(argparse.Action):
    """A list flag: ``--sizes 32,64,128``, ``--sizes 32 64 128`` and mixed forms all give [32, 64, 128].

    ``one_token=True`` (for parsers with positional arguments, which space-separated values would
    swallow) takes the comma-separated form only."""

    def __init__(self, option_strings: Sequence[str], dest: str, item_type: type = str, one_token: bool = False,
                 **kwargs: Any) -> None:
        self.item_type = item_type
        super().__init__(option_strings, dest, nargs=None if one_token else "+", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        values = [values] if isinstance(values, str) else values
        items = [part for value in values for part in value.replace(",", " ").split()]
        try:
            setattr(namespace, self.dest, [self.item_type(item) for item in items])
        except ValueError:
            parser.error(f"{option_string}: expected {self.item_type.__name__} values, got {' '.join(values)}")


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
