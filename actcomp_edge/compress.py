"""What the backward keeps of a fine-tuned conv's input, per method (numpy; runs on the device).

``compress(method, x, ...)`` returns the named pieces the backward graph takes
(``PIECES[method]``, in that order) and what was kept:

- vanilla: input (B, C, H, W)
- hosvd:   core (K1, K2, K3, K4), u_batch (B, K1), u_channel (C, K2), u_height (H, K3), u_width (W, K4)
- svd:     left = U_k diag(s_k) (B, k), right = V_k^T reshaped (k, C, H, W)
- gf-r2:   x_sum (B, C, ceil(H / (r s)), ceil(W / (r s))): sums over (r s) x (r s) patches,
           zero-padded at the bottom/right (Gradient Filter, r = 2)
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Optional

import numpy as np

from .decomposition import hosvd, svd_compress

PIECES = {
    "vanilla": ("input",),
    "hosvd": ("core", "u_batch", "u_channel", "u_height", "u_width"),
    "svd": ("left", "right"),
    "gf-r2": ("x_sum",),
}
GF_RADIUS = 2


@dataclass
class Kept:
    pieces: dict                      # piece name -> array (float32)
    rank_per_mode: Optional[tuple]    # hosvd (K1..K4), svd (k,), else None

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.pieces.values()))


def sum_pool(x: np.ndarray, window: int) -> np.ndarray:
    """(B, C, H, W) -> (B, C, ceil(H/window), ceil(W/window)), zero-padded bottom/right."""
    b, c, h, w = x.shape
    ph, pw = ceil(h / window), ceil(w / window)
    padded = np.zeros((b, c, ph * window, pw * window), dtype=x.dtype)
    padded[:, :, :h, :w] = x
    return padded.reshape(b, c, ph, window, pw, window).sum(axis=(3, 5))


def compress(method: str, x: np.ndarray, eps: Optional[float] = None, ranks=None,
             rank_cap=None, stride: int = 1) -> Kept:
    if method == "vanilla":
        return Kept({"input": x}, None)
    if method == "hosvd":
        t = hosvd(x, eps=eps, ranks=ranks if eps is None else None, rank_cap=rank_cap)
        names = PIECES["hosvd"]
        return Kept(dict(zip(names, (t.core,) + tuple(t.factors))), t.rank_per_mode)
    if method == "svd":
        rank = None if eps is not None else (ranks[0] if ranks is not None else None)
        s = svd_compress(x, eps=eps, rank=rank, rank_cap=rank_cap)
        return Kept({"left": s.left, "right": s.right.reshape((s.rank,) + x.shape[1:])}, (s.rank,))
    if method == "gf-r2":
        return Kept({"x_sum": sum_pool(x, GF_RADIUS * stride)}, None)
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(PIECES)}")
