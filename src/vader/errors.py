"""The one exception type for mistakes a user can make (bad config, missing weights, bad input).

The CLI turns a `VaderError` into one line on stderr and exit status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse


class VaderError(Exception):
    """A user-facing error whose message is one self-contained line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every `vader` subcommand: a usage mistake (a missing or malformed argument) is one
    VaderError line, exit status 2 through the CLI's one error path, instead of a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise VaderError(f"{self.prog}: {message} (see {self.prog} --help)")
