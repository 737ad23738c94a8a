"""argparse pieces shared by the command groups."""

from __future__ import annotations

import argparse
import math
from typing import Any


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return n


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (NaN and inf are refused)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return x


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


class IntermixedParser(argparse.ArgumentParser):
    """A sub-parser that takes its positionals anywhere among the options
    (``bigmodel tune demo --random 8 lr=log:1e-4:1e-2``); plain argparse stops filling an
    ``nargs="*"`` positional at the first option."""

    _inside = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inside:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False

