"""Command-line plumbing both entry points share (`python -m ipadapter_mlx`, `python -m convert`): argparse whose
mistakes are one `error:` line and whose --help shows the defaults, and the library's log shown on the terminal.

Imports nothing heavy."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; options with a real default say it (not `None` or `False`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "default" not in help and action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
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


class _Terminal(logging.StreamHandler):
    """Writes to sys.stdout or sys.stderr as they are when a record comes (apps and tests swap them)."""

    def __init__(self, which: str):
        super().__init__()
        self.which = which

    @property
    def stream(self):
        return getattr(sys, self.which)

    @stream.setter
    def stream(self, _):
        pass


def show_log() -> None:
    """The library logs (progress of downloads and conversions, which encoder was chosen, warnings) through
    `logging`; a command shows them: information on stdout, warnings on stderr as `warning: ...` lines."""
    info = _Terminal("stdout")
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    warn = _Terminal("stderr")
    warn.setLevel(logging.WARNING)
    warn.setFormatter(logging.Formatter("warning: %(message)s"))
    root = logging.getLogger("ipadapter_mlx")
    root.setLevel(logging.INFO)
    root.handlers = [info, warn]
    root.propagate = False
