"""Command-line tools: ``train_lm`` (training) and ``sample`` (sampling from a checkpoint).

Each module has ``main(argv=None) -> int``; the scripts at the repository root
(``train_lm.py``, ``sample.py``) only call it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def number_above(lo: float, *, strict: bool = True) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite numbers > ``lo`` (>= ``lo`` when not strict)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = value > lo if strict else value >= lo
        if not ok or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(
                f"expected a finite number {'>' if strict else '>='} {lo:g}, got {text}")
        return value

    return parse


def run_reporting_usage_errors(parser: argparse.ArgumentParser, args: argparse.Namespace,
                               run: Callable[[argparse.Namespace], int]) -> int:
    """``run(args)``, printing a :class:`UsageError` as ``<prog>: error: ...`` (exit status 2)."""
    try:
        return run(args)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def existing_run(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint metadata of the run already in ``out`` (None when there is none).

    Raises:
        UsageError: there is one and neither ``resume`` nor ``overwrite`` was asked for.
    """
    from linearnexus.train import CHECKPOINT_DIR, read_checkpoint_meta

    ckpt_dir = Path(out) / CHECKPOINT_DIR
    saved = None
    if ckpt_dir.is_dir():
        try:
            saved = read_checkpoint_meta(ckpt_dir)
        except FileNotFoundError:
            saved = None
    if saved is not None and not (resume or overwrite):
        raise UsageError(f"--out: {out} already holds a run (checkpoint at step {saved['step']}); "
                         "pass --resume to continue it or --overwrite to start over")
    return saved
