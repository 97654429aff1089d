"""Command-line tools: ``train_lm`` (training) and ``sample`` (sampling from a checkpoint).

Each module has ``main(argv=None) -> int``; the scripts at the repository root
(``train_lm.py``, ``sample.py``) only call it.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable


class UsageError(Exception):
    """A bad combination of arguments, settings or data, found after parsing; the tool
    prints it as ``<prog>: error: ...`` and returns 2."""


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= ``lo``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {value}")
        return value

    return parse


def run_reporting_usage_errors(parser: argparse.ArgumentParser, args: argparse.Namespace,
                               run: Callable[[argparse.Namespace], int]) -> int:
    """``run(args)``, printing a :class:`UsageError` as ``<prog>: error: ...`` (exit status 2)
    and each warning as one ``<prog>: warning: ...`` line (no source line under it)."""
    def show(message: Warning | str, *rest: object, **kwargs: object) -> None:
        print(f"{parser.prog}: warning: {str(message).removeprefix('warning: ')}",
              file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return run(args)
        except UsageError as e:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 2
