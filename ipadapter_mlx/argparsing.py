"""argparse as the command lines here use it: a mistake is one `error:` line, and --help shows the defaults.

Imports nothing heavy, so every entry point (`python -m ipadapter_mlx`, `python -m convert`) can use it."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; options with a real default say it (not `None` or `False`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "%(default)" not in help and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            help += " (default: %(default)s)"
        return help


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes print `error: MESSAGE (see PROG --help)` and exit 2, not the usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
