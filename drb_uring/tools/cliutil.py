"""What the command line's parts share: their error, the progress line,
the positive-integer option type."""

from __future__ import annotations

import argparse
import sys

from drb_uring.errors import DrbError


class CliError(DrbError):
    pass


def positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {v!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return n


def progress(line: str) -> None:
    print(f"  .. {line}", file=sys.stderr, flush=True)
