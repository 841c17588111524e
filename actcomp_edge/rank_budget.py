"""Ranks for an activation budget (``--activation-budget``, method asi): every fine-tuned
layer's Tucker ranks, chosen together so that what all layers keep fits one budget, from the
mode spectra of real activations (numpy only: the board runs it).

A layer whose input A (B, C, H, W) keeps a Tucker decomposition at ranks K keeps
prod(K) + sum_n d_n K_n floats, and HOSVD loses at most

    ||A - Â||² / ||A||²  <=  sum_n  sum_{i > K_n} sigma_{n,i}² / ||A||²

(De Lathauwer et al. 2000, property 10; sigma_{n,i}: the singular values of A_(n)). The
budget's ranks minimise the sum of these bounds over the layers, greedily: every rank starts
at 1; while a raise fits, the rank raised by one is the one that removes the most of its
layer's bound per added byte.
"""
from __future__ import annotations

from math import prod

import numpy as np

FLOAT_BYTES = 4


def tucker_bytes(shape: tuple, ranks: tuple) -> int:
    """Bytes a layer keeps: the core (K_1..K_4) and one (d_n, K_n) factor per mode."""
    return FLOAT_BYTES * (prod(ranks) + sum(d * k for d, k in zip(shape, ranks)))


def error_bound(energies: list, ranks: tuple) -> float:
    """HOSVD's bound on the relative squared error at ranks (energies[n]: the squared singular
    values of A_(n), descending)."""
    total = float(np.sum(energies[0]))
    if total <= 0.0:
        return 0.0
    return sum(float(np.sum(e[k:])) for e, k in zip(energies, ranks)) / total


def minimum_bytes(shapes: dict) -> int:
    """What the layers keep at rank 1 in every mode: the smallest budget there is."""
    return sum(tucker_bytes(shape, (1,) * len(shape)) for shape in shapes.values())


def allocate(spectra: dict, shapes: dict, budget_bytes: int) -> dict:
    """layer -> ranks (one per mode) whose tucker_bytes sum to at most budget_bytes.
    spectra: layer -> [squared singular values of A_(n), descending, for each mode n];
    shapes: layer -> the activation's shape. ValueError when rank 1 everywhere does not fit."""
    need = minimum_bytes(shapes)
    if need > budget_bytes:
        raise ValueError(f"--activation-budget {budget_bytes / 2 ** 20:.3g} MiB is below rank 1 "
                         f"in every mode of every layer ({need / 2 ** 20:.3g} MiB at this batch)")
    ranks = {name: [1] * len(shape) for name, shape in shapes.items()}
    used = need

    def raises(name):  # (bound removed per byte, mode, bytes added) of each raise by one
        shape, k, energies = shapes[name], ranks[name], spectra[name]
        total = float(np.sum(energies[0]))
        out = []
        for n in range(len(shape)):
            if total > 0.0 and k[n] < len(energies[n]) and energies[n][k[n]] > 0.0:
                cost = tucker_bytes(shape, k[:n] + [k[n] + 1] + k[n + 1:]) - tucker_bytes(shape, k)
                out.append((float(energies[n][k[n]]) / total / cost, n, cost))
        return out

    candidates = {name: raises(name) for name in shapes}
    while True:
        fitting = [(value, name, n, cost) for name, options in candidates.items()
                   for value, n, cost in options if used + cost <= budget_bytes]
        if not fitting:
            return {name: tuple(k) for name, k in ranks.items()}
        _, name, n, cost = max(fitting, key=lambda c: c[0])
        ranks[name][n] += 1
        used += cost
        candidates[name] = raises(name)
