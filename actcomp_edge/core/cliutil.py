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


def input_size(text: str) -> tuple:
    """'224' or '224x160' (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"input size must look like 224 or 224x160, got {text!r}")
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"input size must look like 224 or 224x160, got {text!r}")
    return tuple(parts)


def eps_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"eps must be in (0, 1], got {text!r}")
    return value


def refuse_unused_rank_flags(args, ranked_methods) -> None:
    """ValueError (one line) for --eps, --ranks or --rank-cap with a method that has no ranks
    (vanilla, gf-r2): the flag would be ignored; and for --rank-cap beside --ranks (a cap
    bounds the eps rule's ranks: beside fixed ones it would lower them without a word)."""
    if args.ranks is not None and args.rank_cap is not None:
        raise ValueError("give --ranks or --rank-cap, not both: --rank-cap bounds the ranks "
                         "--eps chooses, --ranks are the ranks")
    if args.method in ranked_methods:
        return
    for flag, value in (("--eps", args.eps), ("--ranks", args.ranks),
                        ("--rank-cap", args.rank_cap)):
        if value is not None:
            raise ValueError(f"{flag} applies to the methods with ranks "
                             f"({', '.join(ranked_methods)}), not {args.method}")


def add_rank_arguments(parser, eps_note: str) -> None:
    """--eps | --ranks, and --rank-cap (hosvd, asi, svd)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--eps", type=eps_value,
                       help="explained-variance threshold in (0,1] for hosvd/svd ranks" + eps_note)
    group.add_argument("--ranks", type=positive_int, nargs="+",
                       help="fixed ranks: 4 for hosvd (B C H W), 1 for svd")
    parser.add_argument("--rank-cap", type=positive_int, nargs="+",
                        help="upper bound on the ranks (hosvd: 1 value for all modes or 4; svd: 1)")
