"""What both command lines (`actcomp`, `actcomp-device`) share: one-line argparse errors and
argument types."""
from __future__ import annotations

import argparse
import math

from .profiles import parse_size


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _finite_float(text: str, accept, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and accept(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (a learning rate)."""
    return _finite_float(text, lambda v: v > 0, "> 0")


def non_negative_float(text: str) -> float:
    """A finite float >= 0 (0: off)."""
    return _finite_float(text, lambda v: v >= 0, ">= 0")


def size_bytes(text: str) -> int:
    """'48MiB', '512MB', '2GiB' or bytes."""
    try:
        return parse_size(int(text) if text.strip().isdigit() else text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
