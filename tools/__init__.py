"""Command-line tools (run as ``python tools/NAME.py``); a package so that tools and tests import
each other's helpers as ``tools.NAME``."""
