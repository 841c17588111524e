"""Ranks for an activation budget (``--activation-budget``, method asi): every fine-tuned
layer's Tucker ranks, chosen together so that what all layers keep fits one budget, from the
mode spectra of real activations (numpy only: the board runs it).

A layer whose input A (B, C, H, W) keeps a Tucker decomposition at ranks K keeps
prod(K) + sum_n d_n K_n floats. The budget's ranks are the paper's eps rule at the largest
eps whose ranks fit: every mode of every layer keeps at least that fraction of its energy
(``decomposition.rank_for_energy``). Kept bytes only grow with eps, so the largest eps is
found by bisection over the values where some rank changes: the cumulative energy fractions
of every mode.

Tried and dropped (benchmarks/budget_fidelity.py, weight-gradient cosine against the exact
one at equal kept bytes, mcunet N=4): spending each byte where it removes the most of HOSVD's
error bound (ants/bees 0.959 against eps 0.8's 0.928, CIFAR-10 0.930 against 0.959), or the
most of the log of each mode's kept energy (0.957, 0.943): both starve the channel mode,
which a depthwise conv's weight gradient needs most.
"""
from __future__ import annotations

from math import prod

import numpy as np

from .decomposition import rank_for_energy

FLOAT_BYTES = 4


def tucker_bytes(shape: tuple, ranks: tuple) -> int:
    """Bytes a layer keeps: the core (K_1..K_4) and one (d_n, K_n) factor per mode."""
    return FLOAT_BYTES * (prod(ranks) + sum(d * k for d, k in zip(shape, ranks)))


def minimum_bytes(shapes: dict) -> int:
    """What the layers keep at rank 1 in every mode: the smallest budget there is."""
    return sum(tucker_bytes(shape, (1,) * len(shape)) for shape in shapes.values())


def eps_ranks(spectra: dict, eps: float) -> dict:
    """layer -> the eps rule's rank of each mode (spectra: layer -> [squared singular values
    of A_(n), descending, for each mode n])."""
    return {name: tuple(rank_for_energy(e, eps) for e in modes) for name, modes in spectra.items()}


def allocate(spectra: dict, shapes: dict, budget_bytes: int) -> tuple:
    """(layer -> ranks, eps): the eps rule's ranks at the largest eps whose tucker_bytes sum
    to at most budget_bytes (eps: the middle of the interval that gives them). shapes: layer -> the activation's shape. ValueError when rank 1
    everywhere does not fit."""
    need = minimum_bytes(shapes)
    if need > budget_bytes:
        raise ValueError(f"--activation-budget {budget_bytes / 2 ** 20:.3g} MiB is below rank 1 "
                         f"in every mode of every layer ({need / 2 ** 20:.3g} MiB at this batch)")

    def kept(eps):
        return sum(tucker_bytes(shapes[n], k) for n, k in eps_ranks(spectra, eps).items())

    # where a rank changes; the smallest gives rank 1 in every mode (within the budget)
    steps = sorted({min(1.0, float(c)) for modes in spectra.values() for e in modes
                    if np.sum(e) > 0 for c in np.cumsum(e) / np.sum(e)} | {1.0})
    lo, hi = 0, len(steps) - 1  # kept(steps[lo]) fits; find the last step that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if kept(steps[mid]) <= budget_bytes else (lo, mid - 1)
    # every eps in (steps[lo - 1], steps[lo]] gives these ranks: the middle is the farthest
    # from a threshold (the one float rounding could move a rank at)
    return eps_ranks(spectra, steps[lo]), (steps[lo - 1] if lo else 0.0) / 2 + steps[lo] / 2
