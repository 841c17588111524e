"""What the backward keeps of a fine-tuned conv's input, per method (numpy; runs on the device).

``compress(method, x, ...)`` returns the named pieces the backward graph takes
(``PIECES[method]``, in that order) and what was kept:

- vanilla: input (B, C, H, W)
- hosvd:   core (K1, K2, K3, K4), u_batch (B, K1), u_channel (C, K2), u_height (H, K3), u_width (W, K4)
- svd:     left = U_k diag(s_k) (B, k), right = V_k^T reshaped (k, C, H, W)
- gf-r2:   x_sum (B, C, ceil(H / (r s)), ceil(W / (r s))): sums over (r s) x (r s) patches,
           zero-padded at the bottom/right (Gradient Filter, r = 2)
- hosvd-tracked: the hosvd pieces, from ``TrackedHosvd`` (ranks fixed between refreshes,
           channel/height/width factors followed across steps by one subspace iteration)
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Optional

import numpy as np

from .decomposition import Tucker, hosvd, mode_spectrum, project_core, svd_compress, unfold

PIECES = {
    "vanilla": ("input",),
    "hosvd": ("core", "u_batch", "u_channel", "u_height", "u_width"),
    "hosvd-tracked": ("core", "u_batch", "u_channel", "u_height", "u_width"),
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
    """(B, C, H, W) -> (B, C, ceil(H/window), ceil(W/window)), zero-padded bottom/right.

    Sum of window**2 strided views (a 6-D reshape + sum is ~10x slower in numpy)."""
    b, c, h, w = x.shape
    ph, pw = ceil(h / window), ceil(w / window)
    if (ph * window, pw * window) != (h, w):
        padded = np.zeros((b, c, ph * window, pw * window), dtype=x.dtype)
        padded[:, :, :h, :w] = x
        x = padded
    total = x[:, :, 0::window, 0::window].copy()
    for i in range(window):
        for j in range(window):
            if i or j:
                total += x[:, :, i::window, j::window]
    return total


def tucker_kept(t: Tucker) -> Kept:
    return Kept(dict(zip(PIECES["hosvd"], (t.core,) + tuple(t.factors))), t.rank_per_mode)


class TrackedHosvd:
    """HOSVD whose ranks are fixed between refreshes and whose factors follow the activation.

    Every ``refresh_every`` steps (and at the first, or when the shape changes) the exact
    HOSVD runs (eps rule or fixed ranks, capped); in between, the batch factor comes from the
    small B x B Gram matrix (samples differ every step) and each other factor U_n is updated
    by one subspace iteration warm-started from the previous step:
        U_n <- orth(A_(n) (A_(n)^T U_n))        cost d_n * rest * K_n instead of d_n^2 * rest + d_n^3
    The result is an orthonormal Tucker tensor, so the backward is the HOSVD one.
    """

    def __init__(self, eps=None, ranks=None, rank_cap=None, refresh_every: int = 50):
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.eps, self.ranks, self.rank_cap, self.refresh_every = eps, ranks, rank_cap, refresh_every
        self.factors = None
        self.shape = None
        self.steps = 0

    def state(self) -> dict:
        """Arrays to checkpoint: the factors and the step count."""
        if self.factors is None:
            return {"steps": np.array(self.steps)}
        return {"steps": np.array(self.steps), "shape": np.array(self.shape),
                **{f"u{n}": u for n, u in enumerate(self.factors)}}

    def restore(self, state: dict) -> None:
        self.steps = int(state["steps"])
        if "shape" in state:
            self.shape = tuple(int(d) for d in state["shape"])
            self.factors = [state[f"u{n}"] for n in range(len(self.shape))]

    def __call__(self, x: np.ndarray) -> Kept:
        due = self.steps % self.refresh_every == 0
        if self.factors is None or due or x.shape[1:] != self.shape[1:]:
            t = hosvd(x, eps=self.eps, ranks=None if self.eps is not None else self.ranks,
                      rank_cap=self.rank_cap)
            factors = list(t.factors)
        else:
            k1 = min(self.factors[0].shape[1], x.shape[0])
            factors = [np.ascontiguousarray(mode_spectrum(x, 0)[1][:, :k1], dtype=x.dtype)]
            for mode in range(1, x.ndim):
                m = unfold(x, mode)
                q, _ = np.linalg.qr(m @ (m.T @ self.factors[mode]))
                factors.append(q.astype(x.dtype))
            t = Tucker(project_core(x, factors), tuple(factors))
        self.factors, self.shape = factors, x.shape
        self.steps += 1
        return tucker_kept(t)


def compress(method: str, x: np.ndarray, eps: Optional[float] = None, ranks=None,
             rank_cap=None, stride: int = 1) -> Kept:
    if method == "vanilla":
        return Kept({"input": x}, None)
    if method == "hosvd":
        return tucker_kept(hosvd(x, eps=eps, ranks=ranks if eps is None else None,
                                 rank_cap=rank_cap))
    if method == "svd":
        rank = None if eps is not None else (ranks[0] if ranks is not None else None)
        s = svd_compress(x, eps=eps, rank=rank, rank_cap=rank_cap)
        return Kept({"left": s.left, "right": s.right.reshape((s.rank,) + x.shape[1:])}, (s.rank,))
    if method == "gf-r2":
        return Kept({"x_sum": sum_pool(x, GF_RADIUS * stride)}, None)
    if method == "hosvd-tracked":
        raise ValueError("hosvd-tracked keeps state across steps: use TrackedHosvd")
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(PIECES)}")
